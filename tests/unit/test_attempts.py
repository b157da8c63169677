"""The attempt policy without Airflow: every classification path from an ended job's event to the
verdict, the attempt's record, the history, the task's result and the state the sensors see."""

from __future__ import annotations

import json

import pytest

from airflow_oellm.config import load_sweep
from airflow_oellm.monitor.attempts import (
    MAX_ATTEMPT_FAULTS,
    JobSettingsError,
    attempt_rules,
    decide_attempt,
    job_settings,
    training_state_after,
)
from airflow_oellm.monitor.classify import FATAL, NAN_INTERVALS, RETRY, SUCCESS
from airflow_oellm.monitor.records import (
    OUTCOME_KEYS,
    SUBMISSION_KEYS,
    AttemptHistory,
    AttemptRecord,
    TrainingState,
    TrainingStatus,
)
from airflow_oellm.monitor.watch import PROGRESS_CURVE, empty_summary
from airflow_oellm.slurm.states import JobState, JobStatus
from tests.conftest import REPO

pytestmark = pytest.mark.unit
SWEEP = REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml"
START, END = "2026-12-01T10:00:00", "2026-12-01T12:30:00"  # 2.5 h


@pytest.fixture(scope="module")
def experiment() -> dict:
    return load_sweep(SWEEP).experiments[0].runtime_config()


@pytest.fixture(scope="module")
def training(experiment):
    on_gpus = {**experiment, "slurm": {**experiment["slurm"], "nodes": 2, "gpus_per_node": 4}}
    return job_settings(experiment=on_gpus, job=None, task_id="train")


@pytest.fixture(scope="module")
def script():
    return job_settings(experiment=None, job=None, task_id="tool", output_dir="/out/tool/")


def ended(
    state: str, *, job_id: str = "101", tail: str = "", exit_code: int | None = None, by: str | None = None, **summary
) -> dict:
    status = JobStatus(
        job_id, JobState(state), raw_state=state, exit_code=exit_code, cancelled_by=by, start=START, end=END
    )
    return {
        "job_id": job_id,
        "log_path": f"/out/logs/x-{job_id}.out",
        "status": status.to_dict(),
        "hang": summary.pop("hang", False),
        "diverged": False,
        "cancelled_by_us": summary.pop("cancelled_by_us", False),
        "summary": {**empty_summary(), **summary},
        "tail": tail,
        "log_bytes": 1000,
    }


def submitted(try_number: int, job_id: str, before: int | None) -> AttemptRecord:
    return AttemptRecord(try_number, job_id, before, "submitted", f"/out/logs/x-{job_id}.out", 1.0e9, 8)


def history_of(*attempts: AttemptRecord) -> AttemptHistory:
    return AttemptHistory(tuple(attempts))


def test_a_finished_training_succeeds(training):
    history = history_of(submitted(1, "101", 0))
    event = ended("COMPLETED", training_done=True, last_iteration=1000, checkpoints_saved=[500, 1000])
    decision = decide_attempt(history, 1, 2, event, 1000, training)
    assert decision.classification.verdict == SUCCESS
    assert decision.training_state is TrainingState.COMPLETED
    assert decision.status_fields == {"iteration": 1000}
    attempt = decision.attempt
    assert (attempt.verdict, attempt.state, attempt.checkpoint_after, attempt.last_iteration) == (
        SUCCESS,
        "COMPLETED",
        1000,
        1000,
    )
    assert training.gpus == 8 and attempt.gpu_hours == 20.0
    result = decision.result
    assert set(result) == {
        "job_ids",
        "final_state",
        "classification",
        "last_iteration",
        "checkpoint",
        "events",
        "summary",
        "attempts",
    }
    assert result["job_ids"] == ["101"] and result["checkpoint"] == 1000 and result["final_state"] == "COMPLETED"
    assert result["attempts"] == decision.history.to_dict()["attempts"]
    assert list(result["attempts"][0]) == [*SUBMISSION_KEYS, *OUTCOME_KEYS]


def test_a_completed_job_that_is_not_a_training_succeeds(script):
    decision = decide_attempt(AttemptHistory(), 1, 0, ended("COMPLETED"), None, script)
    assert decision.classification.verdict == SUCCESS and decision.training_state is TrainingState.COMPLETED
    assert decision.attempt.gpu_hours is None  # a plain script: its GPUs are unknown


def test_a_completed_training_without_the_done_line_is_not_success(training):
    decision = decide_attempt(history_of(submitted(1, "101", 0)), 1, 2, ended("COMPLETED"), 500, training)
    assert decision.classification.verdict == RETRY and "before the last iteration" in decision.classification.reason


def test_a_time_limit_retries_until_the_last_try(training):
    event = ended("TIMEOUT", tail="*** JOB 101 ON n1 CANCELLED AT x DUE TO TIME LIMIT ***", last_iteration=600)
    first = decide_attempt(history_of(submitted(1, "101", 0)), 1, 2, event, 500, training)
    assert first.classification.verdict == RETRY and first.training_state is TrainingState.RETRYING
    assert first.status_fields == {"reason": first.classification.reason, "iteration": 500}
    history = first.history.put(submitted(3, "103", 1000))
    last = decide_attempt(history, 3, 2, ended("TIMEOUT", job_id="103"), 1500, training)
    # the verdict stays a retry (Airflow ends the task: no try left); the sensors see it failed for good
    assert last.classification.verdict == RETRY and last.training_state is TrainingState.FAILED


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (ended("FAILED", tail="torch.OutOfMemoryError: CUDA out of memory.", iterations_run=5), "CUDA out of memory"),
        (ended("OUT_OF_MEMORY"), "host memory"),
        (ended("CANCELLED", by="1001"), "cancelled by a user"),
        (ended("FAILED", exit_code=17), "exit 17"),
        (ended("TIMEOUT", nan_intervals=NAN_INTERVALS), "the loss diverged"),
        (ended("FAILED", tail="Traceback (most recent call last):\n  ValueError: bad arg"), "traceback"),
        (ended("DEADLINE"), "DEADLINE"),
    ],
)
def test_fatal_endings_fail_for_good(training, event, reason):
    decision = decide_attempt(history_of(submitted(1, "101", 0)), 1, 5, event, 0, training)
    assert decision.classification.verdict == FATAL and reason in decision.classification.reason
    assert decision.training_state is TrainingState.FAILED


def test_a_user_cancel_is_fatal_but_our_own_cancel_of_a_hang_retries(training):
    cancelled = JobStatus("101", JobState.CANCELLED, cancelled_by="1001").to_dict()
    user = {**ended("CANCELLED"), "status": cancelled}
    hang = {**user, "hang": True, "cancelled_by_us": True}
    assert decide_attempt(AttemptHistory(), 1, 2, user, 0, training).classification.verdict == FATAL
    decision = decide_attempt(AttemptHistory(), 1, 2, hang, 0, training)
    assert decision.classification.verdict == RETRY and "hang" in decision.classification.reason


def test_a_vanished_job_retries(training):
    event = {**ended("COMPLETED"), "status": None}  # not in squeue or sacct: the event has no status
    decision = decide_attempt(AttemptHistory(), 1, 2, event, None, training)
    assert decision.classification.verdict == RETRY and decision.attempt.state == "NOT_FOUND"
    assert decision.attempt.gpu_hours is None


def test_the_progress_guard_turns_a_third_flat_attempt_fatal(training):
    crash = "srun: error: Node failure on lrdn0418\n"
    history = history_of(submitted(1, "101", 500))
    first = decide_attempt(history, 1, 9, ended("FAILED", tail=crash, iterations_run=5), 500, training)
    assert first.classification.verdict == RETRY  # one attempt without progress: once more
    second_history = first.history.put(submitted(2, "102", 500))
    second = decide_attempt(second_history, 2, 9, ended("FAILED", job_id="102", tail=crash), 500, training)
    assert second.classification.verdict == FATAL
    assert second.classification.reason.startswith("node failure; no progress over the last two attempts")
    assert second.classification.exclude_nodes == ("lrdn0418",)
    assert second.history.exclude == ("lrdn0418",)  # merged once, though both attempts named it


def test_the_guard_counts_from_where_the_first_attempt_began(training):
    first = decide_attempt(history_of(submitted(1, "101", 0)), 1, 9, ended("FAILED", iterations_run=5), 500, training)
    second_history = first.history.put(submitted(2, "102", 500))
    second = decide_attempt(second_history, 2, 9, ended("FAILED", job_id="102", iterations_run=5), 500, training)
    assert second.classification.verdict == RETRY  # 0 -> 500 -> 500: one flat attempt so far


def test_progress_free_resumes_are_left_out_of_the_guard(training):
    rerun = ended("FAILED", exit_code=16, iterations_run=3)
    history = history_of(submitted(1, "101", 500))
    first = decide_attempt(history, 1, 9, rerun, 500, training)
    assert first.classification.verdict == RETRY and first.classification.progress_free
    assert first.attempt.progress_free
    # two more flat attempts after it: the guard counts from the first attempt that counts
    second = decide_attempt(
        first.history.put(submitted(2, "102", 500)), 2, 9, ended("FAILED", job_id="102"), 500, training
    )
    assert second.classification.verdict == RETRY
    third_history = second.history.put(submitted(3, "103", 500))
    third = decide_attempt(third_history, 3, 9, ended("FAILED", job_id="103"), 500, training)
    assert third.classification.verdict == FATAL and "no progress" in third.classification.reason


def test_the_guard_spares_jobs_that_are_not_trainings(script):
    history = history_of(submitted(1, "1", None), submitted(2, "2", None))
    for try_number in (1, 2):
        history = decide_attempt(history, try_number, 9, ended("FAILED", job_id=str(try_number)), None, script).history
    third = decide_attempt(history.put(submitted(3, "3", None)), 3, 9, ended("FAILED", job_id="3"), None, script)
    assert third.classification.verdict == RETRY


def test_the_last_iteration_falls_back_to_where_the_job_resumed(training):
    resumed_at_end = ended("COMPLETED", training_done=True, resumed_from=1000)
    assert decide_attempt(AttemptHistory(), 1, 2, resumed_at_end, 1000, training).attempt.last_iteration == 1000
    from_scratch = ended("FAILED", resumed_from=0)
    assert decide_attempt(AttemptHistory(), 1, 2, from_scratch, None, training).attempt.last_iteration is None


def test_a_lost_submission_record_is_judged_and_a_try_decided_twice_is_kept_once(training):
    decision = decide_attempt(AttemptHistory(), 2, 3, ended("TIMEOUT", job_id="102"), 700, training)
    assert list(decision.attempt.to_dict())[:3] == ["try", "job_id", "checkpoint_before"]
    assert "submission" not in decision.attempt.to_dict() and decision.attempt.checkpoint_before is None
    again = decide_attempt(decision.history, 2, 3, ended("TIMEOUT", job_id="102"), 700, training)
    assert [a.try_number for a in again.history.attempts] == [2] and again.result["job_ids"] == ["102"]


def test_a_try_that_judges_an_earlier_tries_job_keeps_both_records_and_lists_the_job_once(training):
    # try 1 deferred on job 101 and its worker died before judging it; try 2 judged it (a hang it cancelled)
    hung = ended("CANCELLED", hang=True, cancelled_by_us=True)
    decision = decide_attempt(history_of(submitted(1, "101", None)), 2, 3, hung, 900, training)
    assert [(a["try"], a["job_id"], a.get("verdict")) for a in decision.result["attempts"]] == [
        (1, "101", None),
        (2, "101", "retry"),
    ]
    assert decision.result["job_ids"] == ["101"] and decision.attempt.reason.startswith("hang")


def test_what_an_attempt_keeps_of_its_log(training):
    curve = [[i, 10.0 - i / 1000] for i in range(1, 5001)]
    faults = [f"fault {i}" for i in range(12)]
    event = ended("TIMEOUT", loss_curve=curve, faults=faults, iteration_ms=812.5, validation=[{"iteration": 5}])
    attempt = decide_attempt(AttemptHistory(), 1, 2, event, 0, training).attempt
    assert len(attempt.loss_curve) <= PROGRESS_CURVE < len(curve) and attempt.loss_curve[-1] == curve[-1]
    assert attempt.faults == faults[:MAX_ATTEMPT_FAULTS] and attempt.iteration_ms == 812.5
    assert attempt.validation == [{"iteration": 5}]


def test_the_state_after_a_try():
    assert training_state_after(SUCCESS, 3, 2) is TrainingState.COMPLETED
    assert training_state_after(FATAL, 1, 5) is TrainingState.FAILED
    assert training_state_after(RETRY, 1, 2) is TrainingState.RETRYING
    assert training_state_after(RETRY, 2, 2) is TrainingState.RETRYING  # try 2 of 3
    assert training_state_after(RETRY, 3, 2) is TrainingState.FAILED
    assert training_state_after(RETRY, 1, 0) is TrainingState.FAILED


def test_settings_from_a_megatron_experiment_a_side_job_and_a_script(experiment, training, script):
    assert training.training and training.config is not None
    assert training.checkpoint_dir == experiment["backend"]["args"]["save"]
    assert training.stop_nan_limit == training.classify_nan_limit == training.config.monitoring.nan_intervals
    assert training.script_path(2) == f"{training.script_dir}/{training.name}-try2.sbatch"
    convert = job_settings(experiment=experiment, job={"kind": "convert", "iteration": 500}, task_id="convert")
    assert not convert.training and convert.checkpoint_dir is None and convert.stop_nan_limit == 0
    assert convert.output_dir != training.output_dir
    assert (script.output_dir, script.log_path, script.script_dir) == (
        "/out/tool",
        "/out/tool/logs/tool-%j.out",
        "/out/tool/scripts",
    )
    assert (script.training, script.stop_nan_limit, script.classify_nan_limit) == (False, 0, NAN_INTERVALS)
    assert job_settings(experiment=experiment, job=None, task_id="t", expects_training=False).training is False


def test_settings_refuse_what_cannot_be_built(experiment):
    with pytest.raises(JobSettingsError, match="cannot build"):
        job_settings(experiment=experiment, job={"kind": "cooldown", "cooldown": 99}, task_id="t")
    broken = {**experiment, "slurm": {**experiment["slurm"], "nodes": "many"}}
    with pytest.raises(JobSettingsError, match="invalid experiment config"):
        job_settings(experiment=broken, job=None, task_id="t")


def test_own_rules_come_before_the_config_and_the_defaults(experiment, training):
    own = [{"verdict": "fatal", "reason": "own", "pattern": "corrupt shard"}]
    settings = job_settings(experiment=experiment, job=None, task_id="train", classification_rules=own)
    assert [r.reason for r in settings.rules[:1]] == ["own"]
    assert settings.rules[1:] == training.rules
    assert attempt_rules([], own)[0].reason == "own" and len(attempt_rules([])) == len(training.rules) - len(
        training.config.monitoring.rules
    )
    event = ended("TIMEOUT", tail="corrupt shard 7")
    assert decide_attempt(AttemptHistory(), 1, 5, event, 0, settings).classification.reason == "own"


def test_records_keep_their_wire_keys():
    attempt = submitted(1, "101", None)
    assert list(attempt.to_dict()) == list(SUBMISSION_KEYS)
    assert AttemptRecord.from_dict(attempt.to_dict()) == attempt
    older = {k: v for k, v in attempt.to_dict().items() if k != "gpus"}  # written before gpus was kept
    assert AttemptRecord.from_dict(older).to_dict() == older
    stored = {
        "attempts": [{"try": 1, "job_id": "9", "checkpoint_before": 3, "unknown_later_key": 1}],
        "exclude": ["n1"],
    }
    history = AttemptHistory.from_dict(stored)
    assert history.to_dict() == {"attempts": [{"try": 1, "job_id": "9", "checkpoint_before": 3}], "exclude": ["n1"]}
    assert AttemptHistory.from_dict(None) == AttemptHistory() == AttemptHistory.from_dict("garbage")


def test_the_status_file_round_trips_and_ignores_what_is_not_this_runs():
    status = TrainingStatus(TrainingState.FAILED, "run1", 2, "7", "/l", 5.0, "oom", 1000)
    assert json.loads(status.to_json()) == {
        "state": "failed",
        "run_id": "run1",
        "try": 2,
        "job_id": "7",
        "log_path": "/l",
        "updated": 5.0,
        "reason": "oom",
        "iteration": 1000,
    }
    running = TrainingStatus(TrainingState.RUNNING, "run1", 1, "7", "/l", 5.0)
    assert set(json.loads(running.to_json())) == {"state", "run_id", "try", "job_id", "log_path", "updated"}
    data = status.to_json().encode()
    assert TrainingStatus.from_json(data, "run1") == status
    assert TrainingStatus.from_json(data, None) == status
    assert TrainingStatus.from_json(data, "run2") is None
    for bad in (None, b"", b"{", b"[1]", b'{"state": "sleeping", "run_id": "run1"}'):
        assert TrainingStatus.from_json(bad, "run1") is None, bad
    assert status.state.final and not TrainingState.RETRYING.final


def test_gpu_hours_used_by_an_attempt():
    from airflow_oellm.monitor.accounting import attempt_used_gpu_hours, running_gpu_hours_estimate, used_gpu_hours

    assert attempt_used_gpu_hours(START, END, 4) == 10.0
    assert attempt_used_gpu_hours(END, START, 4) == 0.0  # clock skew never counts negative
    assert attempt_used_gpu_hours("2026-12-01T10:00:00", "2026-12-01T10:00:07", 1) == 0.0019  # 4 places
    for start, end, gpus in ((None, END, 4), (START, "Unknown", 4), (START, END, None), ("", END, 1)):
        assert attempt_used_gpu_hours(start, end, gpus) is None
    assert used_gpu_hours([1.5, None, 2, True]) == 3.5
    assert running_gpu_hours_estimate(0.0, 1800.0, 8) == 4.0 and running_gpu_hours_estimate(10.0, 0.0, 8) == 0.0


def test_the_watch_summary_is_declared_once():
    from typing import get_type_hints

    from airflow_oellm.monitor.records import WatchSummary

    assert list(empty_summary()) == list(get_type_hints(WatchSummary))


def test_a_try_that_lost_the_cluster_leaves_the_attempts_so_far_as_its_result():
    """Its result carries the history, so the report counts what the dashboard counts (not retried
    silently: the task still fails, naming the job)."""
    from airflow.sdk.exceptions import AirflowException

    from airflow_oellm.config.naming import HISTORY_KEY, RESULT_KEY
    from airflow_oellm.operators.submit import SlurmSubmitOperator

    history = {"attempts": [{"try": 1, "job_id": "7", "end": END, "gpu_hours": 3.0, "verdict": "retry"}]}
    pushed: dict[str, object] = {}

    class TaskInstance:  # what _finish uses of the running task instance
        try_number = 2

        def xcom_push(self, key: str, value: object) -> None:
            pushed[key] = value

    class Store(dict):
        def set(self, key: str, value: object) -> None:
            self[key] = value

    task = SlurmSubmitOperator(task_id="train", script="#!/bin/bash\n", output_dir="/o")
    event = {"kind": "error", "job_id": "7", "message": "cannot connect to lumi: timed out"}
    context = {"ti": TaskInstance(), "task_state_store": Store({HISTORY_KEY: history})}
    with pytest.raises(AirflowException, match="lost contact with the cluster while following job 7: cannot connect"):
        task._finish(context, event)
    assert AttemptHistory.of_result(pushed[RESULT_KEY]) == AttemptHistory.from_dict(history)
    assert pushed[RESULT_KEY]["job_ids"] == ["7"]
    assert "cannot connect to lumi" in pushed[RESULT_KEY]["lost_contact"]


def diverged(job_id: str, divergence: dict, **summary) -> dict:
    event = ended("CANCELLED", job_id=job_id, cancelled_by_us=True, **summary)
    return {**event, "divergence": divergence}


SPIKE = {"anomaly": "loss_spike", "start": 1240, "last_normal": 1230, "detected_at": 1430, "rewind_to": 1200}


def test_a_diverged_training_is_rewound_until_its_rewinds_are_used_up(training):
    assert training.max_rewinds == 2 and training.skip_data
    history = history_of(submitted(1, "101", 1000))
    first = decide_attempt(history, 1, 5, diverged("101", SPIKE), 1400, training)
    assert (first.classification.verdict, first.classification.progress_free) == (RETRY, True)
    assert first.classification.reason == "rewind: loss spike at 1240 -> checkpoint 1200, skipping 1230-1430"
    rewind = first.attempt.rewind
    assert rewind["id"] == "rewind-1-job101" and rewind["skipped"] == [1230, 1430] and rewind["discarded"] is None
    assert first.result["checkpoint"] == 1200 and first.status_fields["iteration"] == 1200  # where it resumes
    assert first.training_state is TrainingState.RETRYING
    assert first.history.skipped_iterations() == list(range(1230, 1431))

    # the rewound job times out (an ordinary retry), then diverges again: the second rewind
    history = first.history.put(submitted(2, "102", 1200))
    second = decide_attempt(history, 2, 5, ended("TIMEOUT", job_id="102"), 1300, training)
    assert second.classification.verdict == RETRY and second.attempt.rewind is None
    history = second.history.put(submitted(3, "103", 1300))
    nan = {"anomaly": "loss_nan", "start": 1520, "last_normal": 1510, "detected_at": 1550, "rewind_to": 1500}
    third = decide_attempt(history, 3, 5, diverged("103", nan), 1500, training)
    assert third.classification.reason == "rewind: NaN loss at 1520 -> checkpoint 1500, skipping 1510-1550"
    assert len(third.history.rewinds) == 2 and third.history.skipped_iterations()[-1] == 1550

    history = third.history.put(submitted(4, "104", 1500))
    last = decide_attempt(history, 4, 5, diverged("104", {**SPIKE, "start": 1620, "rewind_to": 1600}), 1600, training)
    assert last.classification.verdict == FATAL and last.attempt.rewind["id"] == "rewind-3-job104"
    # no resume, a manual one included, may load the diverged weights: the directory goes back all the same
    assert last.classification.reason.endswith("; the save directory is back at checkpoint 1600")
    assert last.result["checkpoint"] == 1600
    assert last.classification.reason.startswith("the loss diverged (loss spike at 1620, no recovery) after 2 rewind")
    assert "rewind: loss spike at 1240" in last.classification.reason  # the history of the rewinds
    assert last.training_state is TrainingState.FAILED


def test_a_rewind_to_before_the_first_checkpoint_and_without_skipping(experiment):
    config = {**experiment, "monitoring": {**experiment["monitoring"], "anomalies": {"rewind": {"skip_data": False}}}}
    settings = job_settings(experiment=config, job=None, task_id="train")
    early = {**SPIKE, "start": 40, "last_normal": 30, "detected_at": 90, "rewind_to": None}
    decision = decide_attempt(history_of(submitted(1, "101", None)), 1, 3, diverged("101", early), None, settings)
    assert decision.classification.reason == "rewind: loss spike at 40 -> the start"
    assert decision.attempt.rewind["skipped"] is None and decision.result["checkpoint"] == 0
    assert decision.history.skipped_iterations() == []


def test_a_training_that_finished_is_not_rewound_and_side_jobs_never_are(training, script):
    done = decide_attempt(
        history_of(submitted(1, "101", 0)), 1, 3, diverged("101", SPIKE, training_done=True), 1500, training
    )
    assert done.attempt.rewind is None and not done.classification.reason.startswith("rewind")
    assert script.max_rewinds == 0
    side = decide_attempt(history_of(submitted(1, "101", None)), 1, 3, diverged("101", SPIKE), None, script)
    assert side.attempt.rewind is None and not side.classification.reason.startswith("rewind")


def test_a_rewind_can_avoid_the_nodes_the_diverged_job_ran_on(experiment):
    rewind = {"rewind": {"exclude_nodes": True}}
    config = {**experiment, "monitoring": {**experiment["monitoring"], "anomalies": rewind}}
    settings = job_settings(experiment=config, job=None, task_id="train")
    event = diverged("101", SPIKE)
    event["status"] = {**event["status"], "nodes": "nid[001-002]"}
    decision = decide_attempt(history_of(submitted(1, "101", 1000)), 1, 3, event, 1400, settings)
    assert decision.classification.reason.endswith(", skipping 1230-1430, avoiding nid[001-002]")
    assert decision.classification.exclude_nodes == ("nid[001-002]",) and decision.history.exclude == ("nid[001-002]",)
    # off by default: the same divergence excludes nothing
    plain = job_settings(experiment=experiment, job=None, task_id="train")
    assert decide_attempt(history_of(submitted(1, "101", 1000)), 1, 3, event, 1400, plain).history.exclude == ()


def test_a_rewind_can_lower_the_learning_rate_for_some_iterations_then_the_configured_one_returns(experiment):
    rewind = {"rewind": {"learning_rate": {"multiplier": 0.25, "iterations": 50}}}
    config = {**experiment, "monitoring": {**experiment["monitoring"], "anomalies": rewind}}
    settings = job_settings(experiment=config, job=None, task_id="train")
    assert settings.lowered_rate == (0.25, 50)
    first = decide_attempt(history_of(submitted(1, "101", 1000)), 1, 5, diverged("101", SPIKE), 1400, settings)
    # 50 trained iterations from 1200: 1201-1229, then 1431-1451 after the skipped 1230-1430
    assert first.classification.reason.endswith(", skipping 1230-1430, learning rate x0.25 until 1451")
    assert first.attempt.rewind["learning_rate"] == {"multiplier": 0.25, "until": 1451}
    history = first.history
    # a job resuming within the lowered iterations stops at their end; one after them takes the configured rate
    # over the lowered one its checkpoint holds; with no rewind that lowered it, the checkpoint's schedule goes on
    assert [history.learning_rate(c) for c in (1200, 1440, 1451, 1500)] == [(0.25, 1451)] * 2 + [(1.0, None)] * 2
    assert history_of(submitted(1, "101", 1000)).learning_rate(1000) is None
    # the lowered job crashes at 1440 (a retry from inside the lowered iterations), the next stops at 1451 as told
    history = history.put(submitted(2, "102", 1200))
    crashed = decide_attempt(history, 2, 5, ended("FAILED", job_id="102", exit_code=1), 1440, settings)
    assert crashed.classification.verdict == RETRY and "learning rate" not in crashed.classification.reason
    history = crashed.history.put(submitted(3, "103", 1440))
    done = decide_attempt(history, 3, 5, ended("COMPLETED", job_id="103", last_iteration=1451), 1451, settings)
    assert done.classification.verdict == RETRY
    assert (
        done.classification.reason == "learning rate x0.25 until 1451 done: the next job trains at the configured one"
    )
    # an ordinary early exit after the lowered iterations keeps its own reason
    history = done.history.put(submitted(4, "104", 1451))
    later = decide_attempt(history, 4, 5, ended("COMPLETED", job_id="104", last_iteration=1500), 1500, settings)
    assert later.classification.reason.startswith("exited before the last iteration")
    # without skipping, the iterations are counted from the checkpoint on
    plain = {
        **config,
        "monitoring": {**config["monitoring"], "anomalies": {"rewind": {**rewind["rewind"], "skip_data": False}}},
    }
    unskipped = job_settings(experiment=plain, job=None, task_id="train")
    decision = decide_attempt(history_of(submitted(1, "101", 1000)), 1, 5, diverged("101", SPIKE), 1400, unskipped)
    assert decision.attempt.rewind["learning_rate"] == {"multiplier": 0.25, "until": 1250}
    # used up: no lowered rate is recorded for a rewind that does not happen
    anomalies = {"rewind": {"max_rewinds": 1, "learning_rate": {}}}
    once = job_settings(
        experiment={**config, "monitoring": {**config["monitoring"], "anomalies": anomalies}}, job=None, task_id="train"
    )
    history = later.history.put(submitted(5, "105", 1500))
    last = decide_attempt(history, 5, 5, diverged("105", {**SPIKE, "start": 1520, "rewind_to": 1500}), 1500, once)
    assert last.classification.verdict == FATAL and last.attempt.rewind["learning_rate"] is None


def test_a_job_stopped_by_the_sweeps_early_stopping_is_stopped_not_failed(training):
    reason = "stopped early: rank 3/4 at 2000 (loss 3.4 vs best 3.1)"
    event = {**ended("CANCELLED", by="oellm", cancelled_by_us=True), "stopped_early": {"reason": reason, "rung": 2000}}
    decision = decide_attempt(history_of(submitted(1, "101", 1000)), 1, 2, event, 2000, training)
    assert (decision.classification.verdict, decision.classification.reason) == ("stopped", reason)
    assert decision.training_state is TrainingState.STOPPED and decision.training_state.final
    assert decision.status_fields == {"reason": reason, "iteration": 2000}  # what the sensors beside it read
    assert decision.attempt.verdict == "stopped"
    # a training that finished before the request reached it has finished: a success
    done = {**event, "status": {**event["status"], "state": "COMPLETED"}, "summary": {**event["summary"],
            "training_done": True}}  # fmt: skip
    assert decide_attempt(history_of(submitted(1, "101", 1000)), 1, 2, done, 2000, training).classification.verdict == (
        "success"
    )


def test_each_attempt_records_the_nodes_it_ran_on_and_those_its_end_kept_later_tries_off(training):
    from airflow_oellm.dashboard.model import RunRecord, TaskRecord, timeline

    crash = "srun: error: Node failure on lrdn0418\n"
    event = ended("FAILED", tail=crash, iterations_run=5)
    event["status"] = {**event["status"], "nodes": "lrdn[0417-0418]"}
    first = decide_attempt(history_of(submitted(1, "101", 500)), 1, 9, event, 600, training)
    assert first.attempt.nodes == "lrdn[0417-0418]" and first.attempt.excluded_nodes == ["lrdn0418"]
    saved = AttemptHistory.from_dict(json.loads(json.dumps(first.history.to_dict())))
    assert saved.attempts[0].nodes == "lrdn[0417-0418]" and saved.attempts[0].excluded_nodes == ["lrdn0418"]
    run = RunRecord("d", "r", "running", tasks=[TaskRecord("train", -1, "up_for_retry", 1, 8)],
                    histories={("train", -1): first.history.to_dict()})  # fmt: skip
    texts = [(t.kind, t.text) for t in timeline(run)]
    assert ("retry", f"training try 1: job 101 on lrdn[0417-0418] ended FAILED at iteration None -> retry "
            f"({first.classification.reason})") in texts, texts  # fmt: skip
    assert ("exclude", "training try 1: later tries avoid lrdn0418") in texts, texts
