"""The job records of the local-process batch system, on disk, and what state each job is in.

    <root>/next_id, <root>/lock       job ids and CPU slots, under flock
    <root>/jobs/<id>/job.json         what was submitted (written once by sbatch)
    <root>/jobs/<id>/supervisor.json  the supervisor's pid (written by sbatch once it started)
    <root>/jobs/<id>/start.json       the job got its CPUs and started (time, node)
    <root>/jobs/<id>/pgid.json        the batch shell's process group
    <root>/jobs/<id>/cancel.json      scancel asked for it (who, when)
    <root>/jobs/<id>/end.json         final state, exit code, end time

Every file is written once, atomically, so a reader never sees half a record, and the state
follows from which files exist: no end and no live supervisor means the supervisor died, which a
cluster would report as NODE_FAIL.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINISHED_VISIBLE_SECONDS = 300  # squeue shows finished jobs this long (SLURM's MinJobAge)
KEEP_RECORDS_SECONDS = 30 * 86400
SUBMIT_GRACE_SECONDS = 60  # a record without a supervisor this old: sbatch died before starting it


def default_root() -> Path:
    return Path(os.environ.get("OELLM_LOCAL_JOBS_DIR") or Path.home() / ".oellm" / "local-jobs")


def node_name() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def cpu_capacity() -> int:
    configured = os.environ.get("OELLM_LOCAL_CPUS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else os.cpu_count() or 1


def kill_wait_seconds() -> float:
    """Between SIGTERM and SIGKILL on cancel or time limit (SLURM's KillWait)."""
    return float(os.environ.get("OELLM_LOCAL_KILL_WAIT", "30"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot), to tell it from a later one with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, ticks: int | None) -> bool:
    if Path("/proc/self/stat").exists():
        current = process_start_ticks(pid)
        return current is not None and (ticks is None or current == ticks)
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    directory: Path
    job: dict[str, Any]
    supervisor: dict[str, Any] | None
    start: dict[str, Any] | None
    pgid: dict[str, Any] | None
    cancel: dict[str, Any] | None
    end: dict[str, Any] | None

    # a record is a snapshot: its liveness and state are decided once (one /proc read, one answer per listing)
    @functools.cached_property
    def supervisor_alive(self) -> bool:
        return self.supervisor is not None and process_alive(self.supervisor["pid"], self.supervisor.get("ticks"))

    @functools.cached_property
    def state(self) -> str:
        if self.end is not None:
            return self.end["state"]
        if self.supervisor is None:
            return "PENDING" if time.time() - self.job["submit_time"] < SUBMIT_GRACE_SECONDS else "NODE_FAIL"
        if not self.supervisor_alive:
            return "NODE_FAIL"
        if self.start is None:
            return "PENDING"
        return "COMPLETING" if self.cancel is not None else "RUNNING"

    @property
    def is_active(self) -> bool:
        return self.state in ("PENDING", "RUNNING", "COMPLETING")

    @property
    def end_time(self) -> float | None:
        if self.end is not None:
            return self.end["time"]
        return None if self.is_active else self.job["submit_time"]

    @property
    def cpus(self) -> int:
        return int(self.job["spec"]["cpus"])


class JobStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()
        self.jobs_dir = self.root / "jobs"

    def ensure(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure()
        with open(self.root / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def allocate_id(self) -> str:
        """The next job id (under the lock), its directory created."""
        counter = self.root / "next_id"
        text = counter.read_text().strip() if counter.exists() else ""
        job_id = int(text) if text.isdigit() else 1
        counter.write_text(f"{job_id + 1}\n")
        (self.jobs_dir / str(job_id)).mkdir(mode=0o700)
        return str(job_id)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / str(job_id)

    def load(self, job_id: str) -> JobRecord | None:
        directory = self.job_dir(job_id)
        job = read_json(directory / "job.json")
        if job is None:
            return None
        return JobRecord(
            job_id=str(job_id),
            directory=directory,
            job=job,
            supervisor=read_json(directory / "supervisor.json"),
            start=read_json(directory / "start.json"),
            pgid=read_json(directory / "pgid.json"),
            cancel=read_json(directory / "cancel.json"),
            end=read_json(directory / "end.json"),
        )

    def all(self) -> list[JobRecord]:
        if not self.jobs_dir.is_dir():
            return []
        ids = sorted((p.name for p in self.jobs_dir.iterdir() if p.name.isdigit()), key=int)
        return [r for r in (self.load(i) for i in ids) if r is not None]

    def records(self) -> list[JobRecord]:
        """Every job, after stopping what is left of jobs whose supervisor died (as SLURM does on a lost node)."""
        records = self.all()
        for record in records:
            if record.end is None and record.state == "NODE_FAIL":
                self.reap(record)
        return records

    def reap(self, record: JobRecord) -> None:
        if record.pgid is not None and process_alive(record.pgid["pgid"], record.pgid.get("ticks")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pgid["pgid"], signal.SIGKILL)

    def prune(self) -> None:
        """Forget jobs that ended long ago."""
        cutoff = time.time() - KEEP_RECORDS_SECONDS
        for record in self.all():
            ended = record.end_time
            if ended is not None and ended < cutoff:
                for path in sorted(record.directory.iterdir()):
                    path.unlink()
                record.directory.rmdir()

    def cpus_in_use(self) -> int:
        return sum(r.cpus for r in self.all() if r.start is not None and r.end is None and r.supervisor_alive)
