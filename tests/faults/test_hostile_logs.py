"""Hostile log content: endless lines, binary and invalid UTF-8, and a 1 GiB log. The watch keeps its
memory bounded, still finds the events after the junk, and reaches the end of a huge log in a few
polls (skipping ahead, and saying how much), read with the real shell commands the hooks send."""

from __future__ import annotations

import os
import random

from airflow_oellm.hooks.slurm import SlurmHook
from airflow_oellm.monitor.events import MAX_LINE_BYTES, EventMatcher, event_specs
from airflow_oellm.monitor.watch import DRAIN_BYTES, MAX_BACKLOG_BYTES, READ_BYTES, JobWatch, WatchState
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.slurm.states import JobState, JobStatus
from airflow_oellm.slurm.target import ClusterTarget

ITERATION = (
    " [2026-11-29 07:00:00] iteration       40/      40 | consumed samples:          320 | elapsed time per "
    "iteration (ms): 100.0 | learning rate: 3.000000E-04 | global batch size:     8 | lm loss: 2.500000E+00 |"
    " loss scale: 1.0 | grad norm: 0.500 | number of skipped iterations:   0 | number of nan iterations:   0 |\n"
)
THE_END = ITERATION + "[after training is done] datetime: 2026-11-29 07:00:01\n"


def test_endless_lines_binary_and_invalid_utf8_are_survived():
    rng = random.Random(8)
    junk = [
        b"x" * (10 * 1024 * 1024),  # 10 MiB without a newline
        bytes(rng.randrange(256) for _ in range(200_000)),  # binary, NULs included
        b"\xff\xfe\xc3\x28 invalid utf-8 \xed\xa0\x80\n",
        b"\r\n\r\n\x1b[31mcolour\x1b[0m\n",
    ]
    matcher = EventMatcher(event_specs())
    peak, found = 0, []
    for blob in [*junk, THE_END.encode()]:
        for i in range(0, len(blob), READ_BYTES):
            found += matcher.feed(blob[i : i + READ_BYTES])[1]
            peak = max(peak, len(matcher.partial))
    assert [e.name for e in found] == ["iteration", "training_done"]  # found after 10 MiB of junk
    assert peak <= MAX_LINE_BYTES + READ_BYTES  # an endless line is cut, never held whole
    assert matcher.offset == sum(map(len, junk)) + len(THE_END)
    restart = EventMatcher.from_state(event_specs(), matcher.state())
    assert restart.offset == matcher.offset


def test_the_events_after_the_junk_are_found():
    matcher = EventMatcher(event_specs())
    junk_lines, junk_events = matcher.feed(b"\x00\xff" * 40_000 + b"x" * (MAX_LINE_BYTES * 3) + b"\n\xc3\x28\n")
    assert junk_events == [] and "\ufffd" in junk_lines[-1]  # invalid UTF-8 shown as U+FFFD, not raised
    _, events = matcher.feed(THE_END.encode())
    assert [e.name for e in events] == ["iteration", "training_done"] and events[0].groups["iteration"] == 40


def test_a_one_gib_log_is_skipped_to_its_end_in_a_few_polls(tmp_path, reliability):
    log = tmp_path / "huge.out"
    with open(log, "wb") as f:
        f.truncate(1024**3)  # a sparse GiB of NULs, then the job's last lines
        f.seek(0, os.SEEK_END)
        f.write(b"\n" + THE_END.encode())
    size = log.stat().st_size
    hook = SlurmHook(cluster=ClusterTarget(local_commands=True))
    watch = JobWatch(event_specs(), WatchState("9", str(log)), inactivity_threshold=None, now=0)
    running, ended = JobStatus("9", JobState.RUNNING), JobStatus("9", JobState.COMPLETED, exit_code=0)
    polls = []
    for i in range(10):
        status = running if i == 0 else ended
        request = watch.read_request()
        assert request[2] <= DRAIN_BYTES  # never more than one drain window per poll
        chunk = hook.poll_cycle([], CycleRequest(reads=[request])).chunks[0]
        polls.append(watch.apply(float(i), status, chunk))
        if polls[-1].finished:
            break
    assert polls[-1].finished and len(polls) <= 3, [(p.skipped, p.finished) for p in polls]
    summary = watch.state.summary
    assert polls[0].skipped > size - MAX_BACKLOG_BYTES - READ_BYTES  # while running: jumped to the last 64 KiB
    assert summary["log_skipped_bytes"] == sum(p.skipped for p in polls)
    assert summary["training_done"] and summary["last_iteration"] == 40  # the end was read
    assert watch.offset == size
    reliability.record(
        "a 1 GiB job log",
        f"read to its end in {len(polls)} polls, {summary['log_skipped_bytes'] / 2**20:.0f} MiB skipped and "
        "counted; the end classified from the last lines",
        polls_to_the_end=len(polls),
    )
