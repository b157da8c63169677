"""Poller bookkeeping with a scripted hook (the cluster tests cover the real thing)."""

from __future__ import annotations

import asyncio

import pytest

from airflow_oellm.slurm.commands import FileChunk, SlurmCommandError
from airflow_oellm.slurm.operations import CycleRequest, CycleResult
from airflow_oellm.slurm.states import JobState, JobStatus
from airflow_oellm.triggers.poller import MAX_BACKOFF, JobPoller, backoff

pytestmark = pytest.mark.hook


class ScriptedHook:
    """Answers job_statuses from a list of outcomes (statuses or exceptions)."""

    def __init__(self, outcomes, estimates=None):
        self.outcomes = list(outcomes)
        self.estimates = estimates or {}  # what `squeue --start` answers
        self.calls: list[list[str]] = []
        self.start_calls: list[list[str]] = []
        self.closed = 0

    async def poll_cycle(self, ids, request, start_of=()):
        self.calls.append(list(ids))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        chunks = [FileChunk(path, offset, 100, b"x" * min(limit, 3)) for path, offset, limit in request.reads]
        answers = None
        if start_of:
            self.start_calls.append(list(start_of))
            answers = {j: self.estimates.get(j) for j in start_of}
        statuses = {j: JobStatus(j, outcome, reason="Priority") for j in ids}
        return CycleResult(statuses, chunks, [1.0] * len(request.stats), [], [], [], answers)

    async def close(self):
        self.closed += 1


def test_backoff_grows_with_jitter_and_a_cap():
    assert backoff(1, 60, lambda: 0.5) == pytest.approx(1.0)
    assert backoff(3, 60, lambda: 0.5) == pytest.approx(4.0)
    assert backoff(30, 60, lambda: 1.0) == pytest.approx(MAX_BACKOFF * 1.2)
    assert backoff(2, 60, lambda: 0.0) == pytest.approx(1.6)


def test_watchers_share_cycles_and_leave_cleanly():
    hook = ScriptedHook([JobState.RUNNING, JobState.RUNNING, JobState.COMPLETED])

    async def scenario():
        poller = JobPoller(lambda: hook, key="k", interval=0.05, first_check_after=0.01)
        seen = {"1": [], "2": []}

        async def watch(job_id):
            async for update in poller.watch(job_id):
                seen[job_id].append(update.status.state)
                if update.status.is_terminal:
                    return

        await asyncio.gather(watch("1"), watch("2"))
        await asyncio.sleep(0.1)  # let the poller's task notice it has no subscribers left
        return poller, seen

    poller, seen = asyncio.run(scenario())
    assert seen["1"] == seen["2"] == [JobState.RUNNING, JobState.RUNNING, JobState.COMPLETED]
    assert all(sorted(call) == ["1", "2"] for call in hook.calls)  # one query for both
    assert poller.watched == [] and hook.closed == 1  # no watcher left: loop ended, connection closed


def test_failures_are_reported_only_after_the_threshold_and_never_as_a_state(monkeypatch):
    failure = SlurmCommandError("squeue failed: Socket timed out", transient=True)
    hook = ScriptedHook([failure, failure, failure, JobState.RUNNING])

    async def scenario():
        poller = JobPoller(lambda: hook, key="k2", interval=0.01, first_check_after=0.0, failure_threshold=3)
        got = []
        async for update in poller.watch("7"):
            got.append(update)
            if update.status is not None:
                break
        return got

    monkeypatch.setattr("airflow_oellm.triggers.poller.backoff", lambda failures, interval, jitter=None: 0.01)
    got = asyncio.run(scenario())
    assert [u.status is None for u in got] == [True, False]
    assert got[0].consecutive_failures == 3 and "Socket timed out" in got[0].error
    assert got[1].status.state is JobState.RUNNING and got[1].consecutive_failures == 0


def test_permanent_errors_are_reported_at_once():
    hook = ScriptedHook([SlurmCommandError("cannot connect: host key not verifiable", transient=False)])

    async def scenario():
        poller = JobPoller(lambda: hook, key="k3", interval=0.01, first_check_after=0.0, failure_threshold=5)
        async for update in poller.watch("7"):
            return update

    update = asyncio.run(scenario())
    assert update.permanent and update.consecutive_failures == 1 and update.status is None


def test_shared_poller_is_one_per_key_and_uses_the_shortest_interval():
    async def scenario():
        a = JobPoller.shared(lambda: None, key="same", interval=60)
        b = JobPoller.shared(lambda: None, key="same", interval=10)
        c = JobPoller.shared(lambda: None, key="other")
        return a, b, c

    a, b, c = asyncio.run(scenario())
    assert a is b and a is not c and a.interval == 10


def test_file_requests_ride_along_and_come_back_to_their_watcher():
    hook = ScriptedHook([JobState.RUNNING])

    async def scenario():
        poller = JobPoller(lambda: hook, key="k4", interval=0.01, first_check_after=0.0)
        got = {}

        async def watch(name, job_id, request):
            async for update in poller.watch(job_id, request):
                got[name] = update
                return

        await asyncio.gather(
            watch("a", "1", lambda: CycleRequest(reads=[("/a.log", 5, 2)], stats=["/x"])),
            watch("b", None, lambda: CycleRequest(reads=[("/b.log", 0, 10)], stats=["/x", "/y"])),
        )
        return got

    got = asyncio.run(scenario())
    assert [c.path for c in got["a"].chunks] == ["/a.log"] and got["a"].chunks[0].offset == 5
    assert [c.path for c in got["b"].chunks] == ["/b.log"] and got["b"].status is None
    assert got["a"].mtimes == {"/x": 1.0} and got["b"].mtimes == {"/x": 1.0, "/y": 1.0}
    assert hook.calls == [["1"]]  # one cycle for both watchers


def test_a_sync_poll_becomes_the_same_update_the_poller_gives():
    """The worker's own polling loop hands the follower what a triggerer's poller would."""
    from airflow_oellm.slurm.operations import PollUpdate

    status = JobStatus("7", JobState.RUNNING)
    request = CycleRequest(reads=[("/log", 0, 10)], stats=["/out/a", "/out/b"], writes=[("/state", b"{}")])
    result = CycleResult({"7": status}, [FileChunk("/log", 0, 3, b"abc")], [1.0, None], [], [True])
    update = PollUpdate.from_cycle("7", request, result, 4)
    assert update == PollUpdate(
        "7", status, 4, chunks=(result.chunks[0],), mtimes={"/out/a": 1.0, "/out/b": None}, writes_ok=(True,)
    )
    failed = PollUpdate.failed("7", SlurmCommandError("Permission denied", transient=False), 5, 1)
    assert (failed.status, failed.error, failed.permanent, failed.consecutive_failures) == (
        None,
        "Permission denied",
        True,
        1,
    )
    assert PollUpdate.from_cycle(None, CycleRequest(), CycleResult({}, [], [], [], []), 1).status is None


def test_a_watcher_that_needs_its_next_cycle_now_gets_it_before_the_interval():
    """A stop waits for the state that records it: the watcher asks for the next cycle at once, and the poller
    runs it without waiting out its (here one-minute) interval."""
    hook = ScriptedHook([JobState.RUNNING])

    async def scenario():
        poller = JobPoller(lambda: hook, key="k", interval=60, first_check_after=0.01)
        cycles = []

        async def watch():
            async for update in poller.watch("1"):
                cycles.append(update.cycle)
                if len(cycles) == 3:
                    return
                poller.soon()

        await asyncio.wait_for(watch(), 5)
        await asyncio.sleep(0.1)  # let the poller's task notice it has no subscribers left
        return cycles

    assert asyncio.run(scenario()) == [1, 2, 3] and len(hook.calls) == 3


def test_pending_jobs_get_one_start_estimate_ask_per_interval_and_keep_it_between_asks(monkeypatch):
    """One `squeue --start` for all pending jobs, not on the first cycle (nothing is known to pend yet), then
    not again before the interval; each pending status carries its estimate; none is asked once none pends."""
    hook = ScriptedHook([JobState.PENDING] * 4 + [JobState.RUNNING], estimates={"1": 1.8e9, "2": None})
    clock = {"now": 1000.0}

    async def scenario():
        poller = JobPoller(lambda: hook, key="k-start", interval=0.01, first_check_after=0.0)
        poller.start_estimates.interval = 600.0
        got = []

        async def watch(job_id):
            async for update in poller.watch(job_id):
                got.append((job_id, update.status.state, update.status.expected_start))
                clock["now"] += 50.0  # 100 s a cycle: its 5 cycles fit in one interval
                if update.status.state is JobState.RUNNING:
                    return

        await asyncio.gather(watch("1"), watch("2"))
        return got

    monkeypatch.setattr("airflow_oellm.triggers.poller.time.time", lambda: clock["now"])
    got = asyncio.run(scenario())
    assert hook.start_calls == [["1", "2"]]  # asked once, on the second cycle, for both
    first = [e for j, state, e in got if j == "1" and state is JobState.PENDING]
    assert first[0] is None and set(first[1:]) == {1.8e9}  # then kept between asks
    assert all(e is None for j, _, e in got if j == "2")  # SLURM has no estimate for it
    assert all(e is None for _, state, e in got if state is JobState.RUNNING)
