"""Runs one job of the local-process batch system: waits for CPUs, starts the batch script in its own
process group, enforces the time limit and cancels, and writes the final state.

Started by sbatch as a detached process (its own session), so it outlives whoever submitted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

from airflow_oellm.localjobs.spec import expand_path
from airflow_oellm.localjobs.store import (
    JobRecord,
    JobStore,
    cpu_capacity,
    kill_wait_seconds,
    node_name,
    process_start_ticks,
    read_json,
    write_json,
)

TICK = 0.2


class _Stopped(Exception):
    """The supervisor itself was told to stop (SIGTERM/SIGHUP/SIGINT)."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signal.Signals(signum).name)


def supervise(store: JobStore, job_id: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    record = store.load(job_id)
    if record is None:
        return
    try:
        if not _wait_for_cpus(store, record):
            _finish(record, "CANCELLED", "0:0", cancelled_by=(store.load(job_id) or record).cancel)
            return
        _run(store, record)
    except _Stopped as stopped:
        # killed along with the machine's session: stop the job too, and say the node failed
        _finish(record, "NODE_FAIL", "0:0", reason=f"supervisor stopped by {stopped}")


def _wait_for_cpus(store: JobStore, record: JobRecord) -> bool:
    """Start when the job's CPUs are free (False: cancelled while pending)."""
    while True:
        with store.locked():
            if (record.directory / "cancel.json").exists():
                return False
            if store.cpus_in_use() + record.cpus <= cpu_capacity():
                write_json(record.directory / "start.json", {"time": time.time(), "node": node_name()})
                return True
        time.sleep(1.0)


def _run(store: JobStore, record: JobRecord) -> None:
    spec = record.job["spec"]
    node = node_name()
    paths = {
        key: expand_path(
            spec[key],
            job_id=record.job_id,
            name=spec["name"],
            user=record.job["user"],
            node=node,
            workdir=spec["workdir"],
        )
        for key in ("output", "error")
        if spec.get(key)
    }
    mode = "ab" if spec["open_mode"] == "append" else "wb"
    try:
        out = open(paths["output"], mode)  # noqa: SIM115 - handed to the child, closed below
        err = open(paths["error"], mode) if "error" in paths else subprocess.STDOUT  # noqa: SIM115
    except OSError as exc:
        _finish(record, "FAILED", "1:0", reason=f"cannot open the job's output: {exc}")
        return
    env = {**os.environ, **_slurm_env(record, node)}
    try:
        process = subprocess.Popen(
            ["/bin/bash", spec["script"]],
            cwd=spec["workdir"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: signals reach every process of the job
        )
    except OSError as exc:
        _finish(record, "FAILED", "1:0", reason=f"cannot start the batch script: {exc}")
        return
    finally:
        out.close()
        if err is not subprocess.STDOUT:
            err.close()
    pgid = process.pid
    write_json(record.directory / "pgid.json", {"pgid": pgid, "ticks": process_start_ticks(pgid)})
    try:
        state, cancelled_by = _follow(record, process, spec)
    except _Stopped:
        _stop_group(process, pgid)
        raise
    rc = process.returncode
    _kill_group(pgid, signal.SIGKILL)  # what the batch script left behind goes with it, as on a cluster
    exit_code = f"{rc}:0" if rc >= 0 else f"0:{-rc}"
    if state is None:
        state = "COMPLETED" if rc == 0 else "FAILED"
    _finish(record, state, exit_code, cancelled_by=cancelled_by)


def _follow(record: JobRecord, process: subprocess.Popen[bytes], spec: dict[str, Any]) -> tuple[str | None, Any]:
    """Wait for the batch script; returns (CANCELLED | TIMEOUT | None, who cancelled)."""
    start = time.time()
    limit = spec["time_limit"]
    # as on SLURM, `--signal=SIG@t` goes to job steps (srun), which local jobs lack; `B:` reaches the batch shell
    warned = limit and spec["warn_signal"] and spec["warn_batch_only"]
    warn_at = start + limit - spec["warn_seconds"] if warned else None
    state: str | None = None
    cancelled_by = None
    kill_at: float | None = None
    cancel_path = record.directory / "cancel.json"
    while True:
        try:
            process.wait(timeout=TICK)
            return state, cancelled_by
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        if state is None and cancel_path.exists():
            state, cancelled_by = "CANCELLED", read_json(cancel_path)
            _kill_group(process.pid, signal.SIGCONT)
            _kill_group(process.pid, signal.SIGTERM)
            kill_at = now + kill_wait_seconds()
        if warn_at is not None and now >= warn_at:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.Signals[f"SIG{spec['warn_signal']}"])
            warn_at = None
        if state is None and limit and now >= start + limit:
            state = "TIMEOUT"
            _kill_group(process.pid, signal.SIGTERM)
            kill_at = now + kill_wait_seconds()
        if kill_at is not None and now >= kill_at:
            _kill_group(process.pid, signal.SIGKILL)
            kill_at = None


def _stop_group(process: subprocess.Popen[bytes], pgid: int) -> None:
    _kill_group(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=kill_wait_seconds())
    _kill_group(pgid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _slurm_env(record: JobRecord, node: str) -> dict[str, str]:
    spec = record.job["spec"]
    env = {
        "SLURM_JOB_ID": record.job_id,
        "SLURM_JOBID": record.job_id,
        "SLURM_JOB_NAME": spec["name"],
        "SLURM_SUBMIT_DIR": record.job["submit_dir"],
        "SLURM_JOB_NODELIST": node,
        "SLURM_NODELIST": node,
        "SLURMD_NODENAME": node,
        "SLURM_NNODES": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": str(spec["ntasks"]),
        "SLURM_CPUS_PER_TASK": str(spec["cpus"] // max(spec["ntasks"], 1)),
        "SLURM_RESTART_COUNT": "0",
        "SLURM_CLUSTER_NAME": "local",
        "SLURM_JOB_PARTITION": "local",
    }
    if spec.get("comment"):
        env["SLURM_JOB_COMMENT"] = spec["comment"]
    if spec.get("time_limit"):
        env["SLURM_JOB_END_TIME"] = str(int(time.time() + spec["time_limit"]))
    return env


def _finish(record: JobRecord, state: str, exit_code: str, *, cancelled_by: Any = None, reason: str = "") -> None:
    write_json(
        record.directory / "end.json",
        {
            "state": state,
            "exit_code": exit_code,
            "time": time.time(),
            "cancelled_by": (cancelled_by or {}).get("uid"),
            "reason": reason,
        },
    )
