"""`python -m airflow_oellm.localjobs sbatch|squeue|sacct|scancel|scontrol ...`: the local-process
batch_system behind the SLURM commands the provider runs, with their options, output and exit codes.

Also for people: `oellm-local squeue`, `oellm-local scancel 12` work as on a cluster.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import signal as signals
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from airflow_oellm.localjobs.spec import SubmitError, job_spec, parse_options
from airflow_oellm.localjobs.store import (
    FINISHED_VISIBLE_SECONDS,
    JobRecord,
    JobStore,
    cpu_capacity,
    node_name,
    process_start_ticks,
    write_json,
)
from airflow_oellm.localjobs.supervisor import supervise
from airflow_oellm.slurm.timespec import format_slurm_time

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol")
_DEFAULT_SQUEUE_STATES = {"PENDING", "RUNNING", "COMPLETING"}
_COMPACT = {
    "PENDING": "PD",
    "RUNNING": "R",
    "COMPLETING": "CG",
    "COMPLETED": "CD",
    "FAILED": "F",
    "CANCELLED": "CA",
    "TIMEOUT": "TO",
    "NODE_FAIL": "NF",
}
_DEFAULT_REASON = {"FAILED": "NonZeroExitCode", "TIMEOUT": "TimeLimit", "NODE_FAIL": "NodeDown"}


class CommandError(Exception):
    def __init__(self, message: str, rc: int = 1) -> None:
        super().__init__(message)
        self.rc = rc


# ---------------------------------------------------------------- fields


def _when(seconds: float | None) -> str:
    """A time as SLURM prints it: ISO local time, or as `SLURM_TIME_FORMAT` says (a strftime format)."""
    fmt = os.environ.get("SLURM_TIME_FORMAT") or "%Y-%m-%dT%H:%M:%S"
    if fmt == "standard":
        fmt = "%Y-%m-%dT%H:%M:%S"
    return time.strftime(fmt, time.localtime(seconds)) if seconds else "Unknown"


def _duration(seconds: float | None) -> str:
    return format_slurm_time(seconds) if seconds and seconds >= 1 else "00:00:00"


def _started(record: JobRecord) -> float | None:
    return record.start["time"] if record.start else None


def _elapsed(record: JobRecord) -> float | None:
    started = _started(record)
    if started is None:
        return None
    return (record.end["time"] if record.end else time.time()) - started


def _reason(record: JobRecord) -> str:
    state = record.state
    if state == "PENDING":
        return "Resources" if record.supervisor is not None else "None"
    if record.end and record.end.get("reason"):
        return record.end["reason"]
    return _DEFAULT_REASON.get(state, "None")


def _exit_code(record: JobRecord) -> str:
    return record.end["exit_code"] if record.end else "0:0"


def _sacct_state(record: JobRecord) -> str:
    by = record.end.get("cancelled_by") if record.end else None
    return f"{record.state} by {by}" if record.state == "CANCELLED" and by is not None else record.state


def _nodes(record: JobRecord) -> str:
    return record.start["node"] if record.start else ("" if record.state == "PENDING" else "None assigned")


def _limit(record: JobRecord) -> str:
    limit = record.job["spec"]["time_limit"]
    return format_slurm_time(limit) if limit else "UNLIMITED"


Field = Callable[[JobRecord], str]
SQUEUE_FIELDS: dict[str, Field] = {
    "i": lambda r: r.job_id,
    "A": lambda r: r.job_id,
    "F": lambda r: r.job_id,
    "K": lambda r: "N/A",
    "T": lambda r: r.state,
    "t": lambda r: _COMPACT.get(r.state, r.state),
    "r": _reason,
    "R": lambda r: _reason(r) if r.state == "PENDING" else _nodes(r),
    "N": _nodes,
    "j": lambda r: r.job["spec"]["name"],
    "k": lambda r: r.job["spec"].get("comment") or "(null)",
    "M": lambda r: _duration(_elapsed(r)),
    "l": _limit,
    "u": lambda r: r.job["user"],
    "P": lambda r: "local",
    "C": lambda r: str(r.cpus),
    "D": lambda r: "1",
    "V": lambda r: _when(r.job["submit_time"]),
    "S": lambda r: _when(_started(r)) if _started(r) else "N/A",
    "o": lambda r: r.job["submitted_script"],
    "Z": lambda r: r.job["spec"]["workdir"],
}
SACCT_FIELDS: dict[str, Field] = {
    "jobid": lambda r: r.job_id,
    "jobidraw": lambda r: r.job_id,
    "jobname": lambda r: r.job["spec"]["name"],
    "state": _sacct_state,
    "exitcode": _exit_code,
    "reason": _reason,
    "nodelist": _nodes,
    "submit": lambda r: _when(r.job["submit_time"]),
    "start": lambda r: _when(_started(r)),
    "end": lambda r: _when(r.end["time"] if r.end else None),
    "elapsed": lambda r: _duration(_elapsed(r)),
    "timelimit": _limit,
    "comment": lambda r: r.job["spec"].get("comment") or "",
    "user": lambda r: r.job["user"],
    "partition": lambda r: "local",
    "alloccpus": lambda r: str(r.cpus),
    "nnodes": lambda r: "1",
    "workdir": lambda r: r.job["spec"]["workdir"],
}


def _squeue_format(spec: str) -> list[Field | str]:
    parts: list[Field | str] = []
    for literal, code in re.findall(r"([^%]*)(?:%[.-]?\d*([A-Za-z%])|$)", spec):
        if literal:
            parts.append(literal)
        if code == "%":
            parts.append("%")
        elif code:
            if code not in SQUEUE_FIELDS:
                raise CommandError(f"squeue: error: Invalid job format specification: %{code}")
            parts.append(SQUEUE_FIELDS[code])
    return parts


def _ids(text: str, command: str) -> list[str]:
    ids = [i for i in text.split(",") if i]
    for job_id in ids:
        if not job_id.isdigit():
            raise CommandError(f"{command}: error: Invalid job id: {job_id}")
    return ids


# ---------------------------------------------------------------- commands


def sbatch(store: JobStore, argv: Sequence[str]) -> str:
    options, rest = parse_options(argv)
    if not rest:
        raise SubmitError("no batch script given (the local-process batch system does not read one from stdin)")
    script_path = os.path.abspath(rest[0])
    try:
        script_text = Path(script_path).read_text()
    except OSError as exc:
        raise SubmitError(f"Unable to open file {rest[0]}: {exc.strerror}") from None
    spec = job_spec(script_path, script_text, options, os.getcwd(), cpu_capacity())
    if node_name() in spec.exclude:
        raise SubmitError("Batch job submission failed: Requested node configuration is not available")
    with store.locked():
        store.prune()
        job_id = store.allocate_id()
    directory = store.job_dir(job_id)
    copy = directory / "script"
    shutil.copyfile(script_path, copy)  # as sbatch does: editing the file later does not change the job
    copy.chmod(0o700)
    record = {
        "spec": {**spec.__dict__, "script": str(copy), "exclude": list(spec.exclude)},
        "submitted_script": script_path,
        "args": list(rest[1:]),
        "user": getpass.getuser(),
        "submit_time": time.time(),
        "submit_dir": os.getcwd(),
    }
    write_json(directory / "job.json", record)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "airflow_oellm.localjobs", "supervise", job_id],
        env={**os.environ, "OELLM_LOCAL_JOBS_DIR": str(store.root), "PATH": _path_with_this_installation()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "supervisor.log", "ab"),  # noqa: SIM115 - inherited by the child only
        start_new_session=True,  # outlives the caller and its SSH session
        close_fds=True,
    )
    write_json(directory / "supervisor.json", {"pid": supervisor.pid, "ticks": process_start_ticks(supervisor.pid)})
    return job_id if "parsable" in options else f"Submitted batch job {job_id}"


def _path_with_this_installation() -> str:
    """PATH with this interpreter's scripts first (as in an activated venv): jobs find the same `python3`
    and `airflow-oellm` as the Airflow that submitted them."""
    scripts = os.path.dirname(sys.executable)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != scripts]
    return os.pathsep.join([scripts, *rest])


def squeue(store: JobStore, argv: Sequence[str]) -> str:
    options, rest = parse_options(
        argv,
        {"h": "noheader", "t": "states", "j": "jobs", "o": "format", "u": "user", "n": "name", "w": "nodelist"},
        frozenset({"noheader", "me", "all", "array", "long", "start"}),
    )
    if rest:
        raise CommandError(f"squeue: error: Unrecognized option: {rest[0]}")
    states = {s.strip().upper() for s in options.get("states", "").split(",") if s.strip()}
    if "start" in options:  # pending jobs, with their expected start: none here (no backfill scheduler)
        states = states or {"PENDING"}
    if "ALL" in states:
        states = set()
    wanted_ids = _ids(options.get("jobs", ""), "squeue")
    names = {n for n in options.get("name", "").split(",") if n}
    now = time.time()
    rows = []
    for record in store.records():
        state = record.state
        if wanted_ids and record.job_id not in wanted_ids:
            continue
        if names and record.job["spec"]["name"] not in names:
            continue
        if states:
            if state not in states and _COMPACT.get(state, "") not in states:
                continue
        elif "jobs" in options:
            ended = record.end_time
            if ended is not None and now - ended > FINISHED_VISIBLE_SECONDS:
                continue
        elif state not in _DEFAULT_SQUEUE_STATES:
            continue
        rows.append(record)
    if wanted_ids and not rows and not any(store.load(i) for i in wanted_ids):
        raise CommandError("slurm_load_jobs error: Invalid job id specified")
    fmt = _squeue_format(options.get("format", "%.18i %.9P %.8j %.8u %.2t %.10M %.6D %R"))
    lines = ["".join(p if isinstance(p, str) else p(r) for p in fmt) for r in rows]
    if "noheader" not in options:
        lines.insert(0, options.get("format", "JOBID PARTITION NAME USER ST TIME NODES NODELIST(REASON)"))
    return "\n".join(lines)


def sacct(store: JobStore, argv: Sequence[str]) -> str:
    options, rest = parse_options(
        argv,
        {
            "X": "allocations",
            "D": "duplicates",
            "n": "noheader",
            "P": "parsable2",
            "p": "parsable",
            "j": "jobs",
            "o": "format",
            "S": "starttime",
            "E": "endtime",
            "u": "user",
            "a": "allusers",
            "s": "state",
        },
        frozenset({"allocations", "duplicates", "noheader", "parsable2", "parsable", "allusers"}),
    )
    if rest:
        raise CommandError(f"sacct: error: Unrecognized option: {rest[0]}")
    fields = [f.strip() for f in options.get("format", "JobID,JobName,Partition,State,ExitCode").split(",")]
    getters = []
    for name in fields:
        key = name.split("%", 1)[0].lower()
        if key not in SACCT_FIELDS:
            raise CommandError(f'sacct: error: Invalid field requested: "{name}"')
        getters.append(SACCT_FIELDS[key])
    wanted_ids = set(_ids(options.get("jobs", ""), "sacct"))
    names = {n for n in options.get("name", "").split(",") if n}
    states = {s.strip().upper() for s in options.get("state", "").split(",") if s.strip()}
    separator = "|" if "parsable2" in options or "parsable" in options else " "
    lines = []
    for record in store.records():
        if wanted_ids and record.job_id not in wanted_ids:
            continue
        if names and record.job["spec"]["name"] not in names:
            continue
        if states and record.state not in states:
            continue
        lines.append(separator.join(get(record) for get in getters) + ("|" if "parsable" in options else ""))
    if "noheader" not in options:
        lines.insert(0, separator.join(fields))
    return "\n".join(lines)


def scancel(store: JobStore, argv: Sequence[str]) -> str:
    options, rest = parse_options(
        argv,
        {"s": "signal", "b": "batch", "f": "full", "n": "name", "u": "user"},
        frozenset({"batch", "full", "me", "quiet"}),
    )
    sig = options.get("signal")
    try:
        signum = signals.Signals[f"SIG{sig.upper().removeprefix('SIG')}"] if sig else None
    except KeyError:
        raise CommandError(f"scancel: error: Invalid job signal: {sig}") from None
    targets = [store.load(i) for i in _ids(",".join(rest), "scancel")]
    names = {n for n in options.get("name", "").split(",") if n}
    if names:
        targets += [r for r in store.records() if r.job["spec"]["name"] in names and r.is_active]
    if not rest and not names:
        raise CommandError("scancel: error: No job identification provided")
    errors = []
    for job_id, record in zip(rest, targets, strict=False):
        if record is None:
            errors.append(f"scancel: error: Kill job error on job id {job_id}: Invalid job id specified")
    for record in (r for r in targets if r is not None):
        if not record.is_active:
            continue
        if signum is None:
            if record.cancel is None:
                write_json(record.directory / "cancel.json", {"uid": os.getuid(), "time": time.time()})
        elif record.pgid is not None:
            try:
                if "batch" in options and "full" not in options:  # the shell alone, as SLURM's --batch
                    os.kill(record.pgid["pgid"], signum)
                else:
                    os.killpg(record.pgid["pgid"], signum)
            except ProcessLookupError:
                pass
    if errors:
        raise CommandError("\n".join(errors))
    return ""


def scontrol(store: JobStore, argv: Sequence[str]) -> str:
    words = list(argv)
    if words[:2] == ["show", "hostnames"]:
        return node_name()
    if words[:1] == ["update"]:
        settings = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        job_id = settings.get("JobId") or settings.get("JobID") or ""
        if not job_id.isdigit() or store.load(job_id) is None:
            raise CommandError("slurm_update error: Invalid job id specified")
        return ""  # one machine: node exclusions and the like change nothing
    raise CommandError("scontrol: the local-process batch system knows only `update JobId=...` and `show hostnames`")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    store = JobStore()
    if args[:1] == ["supervise"] and len(args) == 2:
        supervise(store, args[1])
        return 0
    if not args or args[0] not in COMMANDS:
        print(f"usage: oellm-local {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    command = {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scancel": scancel, "scontrol": scontrol}
    try:
        output = command[args[0]](store, args[1:])
    except SubmitError as exc:
        print(f"{args[0]}: error: {exc}", file=sys.stderr)
        return 1
    except CommandError as exc:
        print(str(exc), file=sys.stderr)
        return exc.rc
    if output:
        print(output)
    return 0


def shell_functions(python: str) -> str:
    """Bash functions that put the local-process batch system in place of SLURM's commands for one script."""
    run = f"{shlex.quote(python)} -m airflow_oellm.localjobs"
    return "".join(f'{name}() {{ {run} {name} "$@"; }}; ' for name in COMMANDS)
