"""The waits' decisions without Airflow: the log-event wait the trigger and the poke path share, and
the checkpoint wait, over the training status file they read."""

from __future__ import annotations

import pytest

from airflow_oellm.megatron.checkpoints import CheckpointState
from airflow_oellm.monitor.events import event_specs
from airflow_oellm.monitor.records import TrainingState, TrainingStatus
from airflow_oellm.monitor.waiting import LogWait, checkpoint_decision, event_condition
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.states import JobState, JobStatus
from tests.unit.test_monitor import ITERATION_LINE

pytestmark = pytest.mark.unit
ITERATION = next(s for s in event_specs() if s.name == "iteration")
LOG = (ITERATION_LINE + "\n").encode()  # iteration 100, loss 3.14


def job(state: str, job_id: str = "7") -> JobStatus:
    return JobStatus(job_id, JobState(state))


def chunk(data: bytes, offset: int = 0, size: int | None = None) -> FileChunk:
    return FileChunk("/log", offset, offset + len(data) if size is None else size, data)


def training(state: TrainingState, job_id: str | None = "7", log_path: str = "/log") -> TrainingStatus:
    return TrainingStatus(state, "run1", 1, job_id, log_path, 0.0, "why" if state.final else None)


def test_a_met_condition_matches_with_the_events_groups():
    wait = LogWait(ITERATION, event_condition("iteration >= 100"), ("7", "/log"))
    decision = wait.apply(0.0, job("RUNNING"), chunk(LOG), None)
    assert decision.kind == "matched" and decision.event.groups["iteration"] == 100
    event = decision.to_event()
    assert event["kind"] == "matched" and event["job_id"] == "7" and event["groups"]["iteration"] == 100


@pytest.mark.parametrize("condition", ["iteration >= 101", "no_such_group > 0"])
def test_an_unmet_condition_or_a_missing_group_waits(condition):
    wait = LogWait(ITERATION, event_condition(condition), ("7", "/log"))
    assert wait.apply(0.0, job("RUNNING"), chunk(LOG), None).kind == "wait"
    assert wait.read_request(4096) == ("/log", len(LOG), 4096)  # read on from where it stopped


def test_a_log_that_stops_growing_while_the_job_runs_is_inactive():
    wait = LogWait(ITERATION, None, ("7", "/log"), inactivity_threshold=60)
    assert wait.apply(0.0, job("RUNNING"), chunk(b"x\n"), None).kind == "wait"
    assert wait.apply(59.0, job("RUNNING"), chunk(b"", 2, 2), None).kind == "wait"
    decision = wait.apply(61.0, job("RUNNING"), chunk(b"", 2, 2), None)
    assert decision.kind == "inactive" and decision.message == "log /log did not grow for 60 s"
    assert decision.to_event() == {"kind": "inactive", "job_id": "7", "message": decision.message}
    pending = LogWait(ITERATION, None, ("7", "/log"), inactivity_threshold=60)
    for now in (0.0, 100.0, 200.0):  # waiting in the queue is not idling
        assert pending.apply(now, job("PENDING"), chunk(b"", 0, None), None).kind == "wait"


def test_a_job_that_ends_without_the_event():
    wait = LogWait(ITERATION, event_condition("iteration >= 500"), ("7", "/log"))
    assert wait.apply(0.0, job("COMPLETED"), chunk(LOG[:100], 0, len(LOG)), None).kind == "wait"  # not read to the end
    decision = wait.apply(1.0, job("COMPLETED"), chunk(LOG[100:], 100), None)
    assert decision.kind == "ended" and decision.message == "job 7 ended (COMPLETED) without the event iteration"


def test_an_unterminated_last_line_counts_once_the_job_has_ended():
    wait = LogWait(ITERATION, None, ("7", "/log"))
    assert wait.apply(0.0, job("RUNNING"), chunk(LOG[:-1]), None).kind == "wait"
    assert wait.apply(1.0, job("COMPLETED"), chunk(b"", len(LOG) - 1), None).kind == "matched"


def test_following_the_training_waits_for_its_first_job_then_follows_each_resubmission():
    wait = LogWait(ITERATION, event_condition("iteration >= 100"), follows_training=True)
    assert wait.read_request(4096) is None
    assert wait.apply(0.0, None, None, None).kind == "wait"  # no status yet
    assert not wait.retarget(training(TrainingState.RUNNING, job_id=None))
    assert wait.retarget(training(TrainingState.RUNNING, "7", "/log7"))
    assert not wait.retarget(training(TrainingState.RUNNING, "7", "/log7"))  # the same job: nothing starts over
    assert wait.apply(0.0, job("RUNNING"), FileChunk("/log7", 0, 5, b"half "), None).kind == "wait"
    # the job hit its time limit; the training retries: the wait does not end with the job
    retrying = training(TrainingState.RETRYING, "7", "/log7")
    assert wait.apply(1.0, job("TIMEOUT"), FileChunk("/log7", 5, 5, b""), retrying).kind == "wait"
    assert wait.retarget(training(TrainingState.RUNNING, "8", "/log8"))
    assert wait.target == ("8", "/log8") and wait.read_request(10) == ("/log8", 0, 10)
    assert wait.activity is None
    assert wait.apply(2.0, job("RUNNING", "8"), FileChunk("/log8", 0, len(LOG), LOG), None).kind == "matched"


def test_following_the_training_ends_when_it_is_over():
    wait = LogWait(ITERATION, None, follows_training=True)
    decision = wait.apply(0.0, None, None, training(TrainingState.FAILED, job_id=None))
    assert decision.kind == "ended" and decision.message == "the training failed without the event iteration"
    assert decision.to_event() == {"kind": "ended", "message": decision.message}
    wait.retarget(training(TrainingState.RUNNING))
    done = training(TrainingState.COMPLETED)
    assert wait.apply(1.0, job("COMPLETED"), chunk(b"no event\n"), done).kind == "ended"


def test_the_status_of_another_run_is_not_this_trainings():
    other = TrainingStatus(TrainingState.FAILED, "run0", 3, "5", "/old", 0.0, "old").to_json().encode()
    assert TrainingStatus.from_json(other, "run1") is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (None, "wait"),
        (TrainingState.RUNNING, "wait"),
        (TrainingState.RETRYING, "wait"),
        (TrainingState.FAILED, "training_failed"),
        (TrainingState.COMPLETED, "training_ended"),
        (TrainingState.STOPPED, "training_stopped"),
    ],
)
def test_the_checkpoint_wait_over_each_training_state(status, kind):
    state = CheckpointState(tracker=500, complete={500: "torch_dist"})
    decision = checkpoint_decision(state, "/ckpt", 1000, False, training(status) if status else None)
    assert decision.kind == kind
    if kind == "training_failed":
        assert decision.message == "the training failed for good: why (latest checkpoint 500)"
    if kind == "training_stopped":
        assert decision.message == "why (latest checkpoint 500)"  # the early stop's own reason
    assert checkpoint_decision(state, "/ckpt", 500, False, training(status) if status else None).kind == "ready"
