"""The job-following state machine shared by the trigger and the poke path."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from airflow_oellm.monitor.events import event_specs
from airflow_oellm.monitor.outage import DEFAULT_MAX_OUTAGE_SECONDS
from airflow_oellm.monitor.watch import (
    READ_BYTES,
    STATE_READ_LIMIT,
    JobFollower,
    JobWatch,
    WatchState,
)
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.operations import PollUpdate
from airflow_oellm.slurm.pending import queue_state
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


def follower(**kwargs) -> JobFollower:
    return JobFollower(
        "7", "/log", "/state", event_specs(), inactivity_threshold=kwargs.pop("threshold", None), **kwargs
    )


def served(follow: JobFollower, data: bytes, state: str, cycle: int, writes_ok: bool = True) -> PollUpdate:
    """The poller's answer to the follower's request, from a log holding `data`."""
    request = follow.request()
    chunks = tuple(FileChunk(p, o, len(data), data[o : o + n]) for p, o, n in request.reads)
    return PollUpdate("7", status(state), cycle, chunks=chunks, writes_ok=tuple(writes_ok for _ in request.writes))


def test_the_follower_restores_first_then_reads_on_from_the_saved_byte():
    first = follower(nan_limit=0)
    assert first.request().reads == [("/state", 0, STATE_READ_LIMIT)]
    step = first.on_update(PollUpdate("7", status("RUNNING"), 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    assert step.poll_again and first.watch is not None and first.watch.offset == 0
    first.on_update(served(first, LOG[:700], "RUNNING", 2), 1)
    saved = first.watch.state.to_json()
    second = follower(nan_limit=0)
    restored = second.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, len(saved), saved),)), 2)
    assert restored.notices == [(logging.INFO, f"resuming the watch of job 7 at byte {first.watch.offset} of /log")]
    assert second.request().reads[0] == ("/log", first.watch.offset, READ_BYTES)


def test_the_follower_saves_at_once_after_a_checkpoint_else_once_a_minute():
    t = 1.0e9
    follow = follower(nan_limit=0)
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), t)
    follow.on_update(served(follow, b"plain line\n", "RUNNING", 2), t + 10)  # never saved: at once
    assert [write.path for write in follow.request().writes] == ["/state"]
    follow.on_update(served(follow, b"plain line\n", "RUNNING", 3), t + 20)  # written with that cycle
    assert follow.request().writes == []
    follow.on_update(served(follow, b"plain line\n", "RUNNING", 4), t + 70)
    assert follow.request().writes == []  # less than a minute since that save
    line = b"  successfully saved checkpoint from iteration    1000 to /out/run [ t 1/1, p 1/1 ]\n"
    follow.on_update(served(follow, b"plain line\n" + line, "RUNNING", 5), t + 75)
    assert follow.request().writes != []  # noteworthy: saved with the next cycle, not a minute later
    follow.on_update(served(follow, b"plain line\n" + line, "RUNNING", 6, writes_ok=False), t + 80)
    assert follow.request().writes != []  # the write failed: kept until it lands
    follow.on_update(served(follow, b"plain line\n" + line, "RUNNING", 7), t + 85)
    assert follow.request().writes == []


def test_the_follower_publishes_progress_only_when_it_changes():
    follow = follower(nan_limit=0)
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    first = follow.on_update(served(follow, b"", "PENDING", 2), 1)
    assert first.publish is not None and first.publish["job_state"] == "PENDING"
    assert follow.on_update(served(follow, b"", "PENDING", 3), 2).publish is None
    running = follow.on_update(served(follow, LOG, "RUNNING", 4), 3)
    assert running.publish["summary"]["last_iteration"] == 100 and running.publish["job_state"] == "RUNNING"


def test_the_follower_waits_out_an_outage_of_any_kind_for_max_outage():
    day = 86400.0
    for error, permanent in (("Connection refused", False), ("Permission denied (publickey)", True)):
        follow = follower(nan_limit=0, cluster_name="lumi", max_outage=DEFAULT_MAX_OUTAGE_SECONDS)
        failed = PollUpdate("7", None, 1, error, 5, permanent=permanent)
        # the 10 minutes a refused key used to get are long past: it waits, and says so
        steps = [follow.on_update(failed, t) for t in (0.0, 700.0, day, 3 * day)]
        assert all(step.error is None for step in steps)
        assert all(step.notices[0][0] == logging.WARNING for step in steps)
        assert "cannot reach lumi since 1970-01-01 00:00 UTC (3 days 0 h)" in steps[-1].notices[0][1]
        gave_up = follow.on_update(failed, 3 * day + 1)
        assert "gave up after platform.max_outage (259200 s)" in gave_up.error and error in gave_up.error
    unlimited = follower(nan_limit=0, max_outage=None)
    assert unlimited.on_update(PollUpdate("7", None, 1, "timed out", 5), 1e9).error is None


def test_an_outage_is_told_by_kind_published_when_it_starts_and_ended_by_an_answer():
    follow = follower(nan_limit=0, cluster_name="leonardo", max_outage=600)
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    follow.on_update(served(follow, LOG, "RUNNING", 2), 1)
    refused = PollUpdate("7", None, 3, "cannot connect to leonardo: Permission denied for user u", 1, permanent=True)
    first = follow.on_update(refused, 100)
    assert "authentication failed (renew your SSH certificate or key" in first.notices[0][1]
    outage = first.publish["outage"]
    assert (outage["kind"], outage["since"], outage["cluster"]) == ("authentication", 100, "leonardo")
    assert first.publish["summary"]["last_iteration"] == 100  # the last known progress stays
    assert follow.on_update(refused, 160).publish is None  # the same outage: published once
    network = follow.on_update(PollUpdate("7", None, 5, "cannot connect to leonardo: timed out", 2), 220)
    assert network.publish["outage"]["kind"] == "network" and network.publish["outage"]["since"] == 100
    # one more failure, then an answer: the outage ends 200 s + on, and the following carries on
    back = follow.on_update(served(follow, LOG, "RUNNING", 6), 400)
    assert back.notices[0] == (logging.INFO, "job 7: reached leonardo again after 5 min without contact; carrying on")
    assert back.publish is not None and "outage" not in back.publish
    assert follow.outage is None and follow.on_update(refused, 500).error is None  # a new outage, a new count


def test_the_follower_cancels_a_hang_then_finishes_with_a_final_save():
    follow = follower(threshold=60, nan_limit=0)
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    follow.on_update(served(follow, b"x\n", "RUNNING", 2), 0)
    hung = follow.on_update(served(follow, b"x\n", "RUNNING", 3), 100)
    assert hung.later[-1] == (logging.WARNING, "job 7: no log growth and no iteration progress: hung: cancelling it")
    # the cancel waits for the state that says the watch did it: the try that judges the job reads that
    assert not hung.cancel and hung.poll_again and follow.watch.state.cancelled_by_us
    (save,) = follow.request().writes
    assert json.loads(save.data)["cancelled_by_us"] and save.replaces is not None
    assert not follow.on_update(served(follow, b"x\n", "RUNNING", 4, writes_ok=False), 101).cancel  # not saved
    cancel = follow.on_update(served(follow, b"x\n", "RUNNING", 5), 102)
    assert cancel.cancel and not cancel.kill
    assert not follow.on_update(served(follow, b"x\n", "RUNNING", 6), 103).cancel  # once
    done = follow.on_update(served(follow, b"x\n", "CANCELLED", 7), 160)
    assert done.finished and not done.cancel
    final = follow.final_request()
    assert final.reads == [follow.watch.tail_request()] and final.writes[0].path == "/state"
    event = follow.result(b"tail")
    assert event["kind"] == "finished" and event["hang"] and event["cancelled_by_us"] and event["tail"] == "tail"


def test_a_follower_that_joins_an_outage_waits_its_own_max_outage_and_publishes_no_empty_progress():
    follow = follower(nan_limit=0, cluster_name="lumi", max_outage=600)
    old = PollUpdate("7", None, 9, "timed out", 40, failing_since=0.0)  # the poller has failed for an hour
    step = follow.on_update(old, 3600)
    assert step.error is None and follow.outage.since == 3600 and follow.outage.failures == 40
    assert step.publish is None  # nothing restored yet: an empty snapshot would hide the last progress
    # ... but the outage is news: the caller sets it in the progress the last follower published, once
    assert (step.publish_outage["cluster"], step.publish_outage["since"]) == ("lumi", 3600)
    later = follow.on_update(old, 4200)
    assert later.error is None and later.publish_outage is None
    assert "gave up after platform.max_outage (600 s)" in follow.on_update(old, 4201).error


def test_a_stalled_follower_superseded_by_another_takes_its_state_and_never_acts_on_its_own():
    """Airflow moved the trigger off a stalled triggerer: the new follower saved the state since (it cancelled
    the hung job). The old one wakes and decides the same stop: its save is refused, so it cancels nothing,
    reads the newer state and carries on from it, at its byte and knowing the watch cancelled the job."""
    stale, fresh = follower(threshold=60, nan_limit=0), follower(threshold=60, nan_limit=0)
    for f in (stale, fresh):
        f.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
        f.on_update(served(f, b"x\n", "RUNNING", 2), 0)
    fresh.on_update(served(fresh, b"x\n", "RUNNING", 3), 100)  # hung: decided, saved, then cancelled
    assert fresh.on_update(served(fresh, b"x\n", "RUNNING", 4), 101).cancel
    newer = fresh.watch.state.to_json()
    assert stale.on_update(served(stale, b"x\n", "RUNNING", 3), 130).poll_again  # it decides the stop too
    (save,) = stale.request().writes
    assert save.replaces != hashlib.sha256(newer).hexdigest()  # it last saw the file empty
    refused = PollUpdate("7", status("RUNNING"), 4, writes_ok=(False,), superseded=True)
    step = stale.on_update(refused, 131)
    assert not step.cancel and step.poll_again and "another watch of it saved its state" in step.notices[-1][1]
    assert stale.request().reads == [("/state", 0, STATE_READ_LIMIT)] and not stale.request().writes
    stale.on_update(PollUpdate("7", None, 5, chunks=(FileChunk("/state", 0, len(newer), newer),)), 132)
    assert stale.watch.state.cancelled_by_us and stale.watch.state.matcher == fresh.watch.state.matcher
    assert not stale.on_update(served(stale, b"", "RUNNING", 6), 133).cancel  # the stop was the other's to do
    done = stale.on_update(served(stale, b"", "CANCELLED", 7), 140)
    assert done.finished and not done.cancel and stale.result(b"")["cancelled_by_us"]


def test_a_stop_request_of_the_sweeps_early_stopping_cancels_the_job_once_and_is_in_its_result():
    from airflow_oellm.monitor.early_stop import StopRequest

    follow = follower(nan_limit=0, stop_request_path="/out/.oellm/early_stop.json", run_id="run1")
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    requests: dict[str, bytes | None] = {"/out/.oellm/early_stop.json": None}

    def serve(state: str, cycle: int, now: float):
        request = follow.request()
        (log_path, offset, limit), (stop_path, _, _) = request.reads
        assert log_path == "/log" and stop_path == "/out/.oellm/early_stop.json"
        stop = requests[stop_path]
        chunks = (FileChunk(log_path, offset, len(LOG), LOG[offset : offset + limit]),
                  FileChunk(stop_path, 0, None if stop is None else len(stop), stop or b""))  # fmt: skip
        update = PollUpdate("7", status(state), cycle, chunks=chunks, writes_ok=tuple(True for _ in request.writes))
        return follow.on_update(update, now)

    assert not serve("RUNNING", 2, 1).cancel and follow.watch.state.stopped_early is None  # no request
    reason = "stopped early: rank 3/4 at 2000 (loss 3.4 vs best 3.1)"
    requests["/out/.oellm/early_stop.json"] = StopRequest(reason, 2000, "run1", resumed=True).to_json()
    assert not serve("RUNNING", 3, 2).cancel and follow.watch.state.stopped_early is None  # a user resumed it
    requests["/out/.oellm/early_stop.json"] = StopRequest(reason, 2000, "run0").to_json()
    assert not serve("RUNNING", 3, 2).cancel and follow.watch.state.stopped_early is None  # an earlier run's
    requests["/out/.oellm/early_stop.json"] = b"{not json"
    assert not serve("RUNNING", 4, 3).cancel  # not a request
    requests["/out/.oellm/early_stop.json"] = StopRequest(reason, 2000, "run1").to_json()
    asked = serve("RUNNING", 5, 4)
    assert asked.later[-1] == (logging.WARNING, f"job 7: {reason}: cancelling it") and asked.poll_again
    stopped = {"reason": reason, "rung": 2000, "run_id": "run1", "resumed": False}
    assert not asked.cancel and follow.watch.state.stopped_early == stopped
    (save,) = follow.request().writes  # the state saying so is saved first: the try judging the job reads it
    assert json.loads(save.data)["stopped_early"]["rung"] == 2000 and json.loads(save.data)["cancelled_by_us"]
    cancel = serve("RUNNING", 6, 5)
    assert cancel.cancel and not cancel.kill  # cancelled: the job may save on its way out
    assert not serve("RUNNING", 7, 6).cancel  # once
    done = serve("CANCELLED", 8, 7)
    assert done.finished
    assert follow.result(b"")["stopped_early"]["reason"] == reason


def test_a_pending_job_publishes_why_it_waits_and_until_when_and_warns_once_of_a_reason_that_never_clears():
    from dataclasses import replace

    follow = follower(nan_limit=0)
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)

    def pending(reason: str, expected: float | None, cycle: int) -> PollUpdate:
        update = served(follow, b"", "PENDING", cycle)
        return replace(update, status=JobStatus("7", JobState.PENDING, reason=reason, expected_start=expected))

    first = follow.on_update(pending("Priority", None, 2), 1)
    assert first.publish["queue"] == {"reason": "Priority", "category": "priority", "label": "priority",
                                      "clears": True, "fix": None, "expected_start": None}  # fmt: skip
    assert first.later == []
    estimated = follow.on_update(pending("Priority", 1.8e9, 3), 2)  # the estimate came: published again
    assert estimated.publish["queue"]["expected_start"] == 1.8e9
    assert follow.on_update(pending("Priority", 1.8e9, 4), 3).publish is None  # nothing new
    stuck = follow.on_update(pending("QOSMaxWallDurationPerJobLimit", None, 5), 4)
    assert stuck.publish["queue"]["clears"] is False and "slurm.time" in stuck.publish["queue"]["fix"]
    assert stuck.later == [(logging.WARNING, "job 7: " + queue_state("QOSMaxWallDurationPerJobLimit").describe())]
    assert follow.on_update(pending("QOSMaxWallDurationPerJobLimit", None, 6), 5).later == []  # told once
    running = follow.on_update(served(follow, LOG, "RUNNING", 7), 6)
    assert "queue" not in running.publish


def test_new_log_lines_alone_publish_the_progress_at_most_every_thirty_seconds():
    from airflow_oellm.monitor.watch import LOG_TAIL_EVERY

    follow = follower(nan_limit=0)
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    data = b"plain line\n"
    first = follow.on_update(served(follow, data, "RUNNING", 2), 1)
    assert first.publish["log_tail"] == ["plain line"]
    data += b"another line\n"
    assert follow.on_update(served(follow, data, "RUNNING", 3), 3).publish is None  # too soon: the next one
    data += b"a third line\n"
    later = follow.on_update(served(follow, data, "RUNNING", 4), 1 + LOG_TAIL_EVERY)
    assert later.publish["log_tail"] == ["plain line", "another line", "a third line"]
    assert follow.on_update(served(follow, data, "RUNNING", 5), 100).publish is None  # nothing new at all
