"""The job-following state machine shared by the trigger and the poke path."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_oellm.monitor.events import event_specs
from airflow_oellm.monitor.watch import READ_BYTES, JobWatch, WatchState
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.states import JobState, JobStatus
from tests.unit.test_monitor import MEGATRON_LOG

pytestmark = pytest.mark.operators
LOG = MEGATRON_LOG.encode()


def status(state: str) -> JobStatus:
    return JobStatus("7", JobState(state))


def feed_all(watch: JobWatch, data: bytes, state: str, now: float, step: int = 100):
    """Serve the log like the poller does: each cycle the bytes the watch asks for."""
    steps = []
    for i in range(200):
        path, offset, limit = watch.read_request()
        chunk = FileChunk(path, offset, len(data), data[offset : offset + min(limit, step)])
        steps.append(watch.apply(now + i, status(state), chunk))
        if steps[-1].finished or (state == "RUNNING" and watch.offset >= len(data)):
            break
    return steps


def test_running_then_finished_reads_every_byte_once():
    watch = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0)
    steps = feed_all(watch, LOG[:500], "RUNNING", 0)
    steps += feed_all(watch, LOG, "COMPLETED", 1000)
    assert steps[-1].finished
    lines = [line for s in steps for line in s.lines]
    assert "\n".join(lines) + "\n" == MEGATRON_LOG
    summary = watch.state.summary
    assert summary["training_done"] and summary["checkpoints_saved"] == [1000] and summary["iterations_run"] == 1
    assert summary["resumed_from"] == 1000 and len(summary["faults"]) == 5
    assert watch.tail_request() == ("/log", max(0, len(LOG) - 16 * 1024), 16 * 1024)
    result = watch.result(b"last words")
    assert result["tail"] == "last words" and result["status"]["state"] == "COMPLETED"


def test_restored_state_continues_at_the_same_byte():
    first = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0)
    feed_all(first, LOG[:700], "RUNNING", 0, step=60)
    saved = first.state.to_json()
    restored = WatchState.from_json(saved, "7", "/log")
    assert restored is not None and WatchState.from_json(saved, "8", "/log") is None  # another job's state
    second = JobWatch(event_specs(), restored, inactivity_threshold=None, now=10)
    assert second.offset == first.offset
    steps = feed_all(second, LOG, "COMPLETED", 20)
    counts = second.state.summary["counts"]
    assert counts["checkpoint_saved"] == 1 and counts["iteration"] == 1  # nothing twice
    assert steps[-1].finished


def test_the_job_ending_drains_the_log_in_bigger_reads():
    big = b"x" * (3 * READ_BYTES) + b"\n" + LOG
    watch = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0)
    path, _, limit = watch.read_request()
    watch.apply(0, status("COMPLETED"), FileChunk(path, 0, len(big), big[:limit]))
    assert watch.read_request()[2] > READ_BYTES  # draining: larger reads until the end
    steps = feed_all(watch, big, "COMPLETED", 1, step=10**9)
    assert steps[-1].finished and watch.offset == len(big)


def test_truncated_log_is_read_again_from_the_start():
    watch = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0)
    feed_all(watch, LOG, "RUNNING", 0)
    step = watch.apply(100, status("RUNNING"), FileChunk("/log", watch.offset, 10, b""))
    assert step.truncated and watch.offset == 0


def test_hang_is_detected_once_while_running():
    watch = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=60, now=0)
    watch.apply(0, status("PENDING"), FileChunk("/log", 0, None, b""))
    watch.apply(500, status("PENDING"), FileChunk("/log", 0, None, b""))  # pending time is not idle time
    watch.apply(600, status("RUNNING"), FileChunk("/log", 0, 10, b"0123456789"))
    assert not watch.apply(650, status("RUNNING"), FileChunk("/log", 10, 10, b"")).hang_detected
    hung = watch.apply(700, status("RUNNING"), FileChunk("/log", 10, 10, b""))
    assert hung.hang_detected and hung.noteworthy and watch.state.hang
    assert not watch.apply(760, status("RUNNING"), FileChunk("/log", 10, 10, b"")).hang_detected  # reported once


def test_a_diverged_loss_stops_the_job_once():
    log = (
        Path(__file__).resolve().parents[1] / "fixtures" / "megatron_logs" / "core_v0.14.0_nan_intervals.log"
    ).read_bytes()
    watch = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0, nan_limit=3)
    steps = feed_all(watch, log, "RUNNING", 0, step=len(log))
    stopped = [s for s in steps if s.diverged]
    assert len(stopped) == 1 and stopped[0].noteworthy and watch.state.diverged
    assert "diverged" in stopped[0].stop_reason
    assert watch.result()["diverged"] is True
    # off by default (side jobs, hand-written DAGs) and with nan_intervals: 0
    quiet = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0)
    assert not any(s.diverged for s in feed_all(quiet, log, "RUNNING", 0, step=len(log)))
