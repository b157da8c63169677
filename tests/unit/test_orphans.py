"""Which queued jobs are orphaned: the rule of airflow_oellm/monitor/orphans.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.monitor.orphans import (
    FINISHED_TASK_STATES,
    TaskInstanceRef,
    find_orphans,
    state_key,
    task_instances,
)
from airflow_oellm.slurm.identity import JobIdentity
from airflow_oellm.slurm.states import JobState, JobStatus

RUN = "manual__2026-12-06T10:00:00+00:00"


def job(job_id: str, task_id: str, map_index: int = -1, try_number: int = 1, state: str = "RUNNING") -> JobStatus:
    identity = JobIdentity("oellm__s__e", RUN, task_id, map_index, try_number, "/runs/e")
    return JobStatus(job_id, JobState.parse(state), comment=identity.comment)


def test_airflow_task_states_become_task_instances_with_both_readings_of_a_mapped_key():
    refs = task_instances("d", {"r1": {"train": "deferred", "cooldown.train_2": "failed"}, "r2": {"x_1": None}})
    assert TaskInstanceRef("d", "r1", "train", -1, "deferred") in refs
    assert TaskInstanceRef("d", "r1", "cooldown.train", 2, "failed") in refs
    assert TaskInstanceRef("d", "r1", "cooldown.train_2", -1, "failed") in refs  # an unmapped task of that name
    assert {(r.task_id, r.map_index) for r in refs if r.run_id == "r2"} == {("x_1", -1), ("x", 1)}


@given(task_id=st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), map_index=st.integers(-1, 500))
def test_the_key_a_trigger_asks_for_is_the_one_the_reconciler_reads(task_id, map_index):
    refs = task_instances("d", {"r": {state_key(task_id, map_index): "deferred"}})
    assert TaskInstanceRef("d", "r", task_id, map_index, "deferred") in refs


@pytest.mark.parametrize("state", sorted(FINISHED_TASK_STATES))
def test_a_job_whose_task_finished_is_orphaned(state):
    tasks = task_instances("oellm__s__e", {RUN: {"train": state, "cooldown.train_0": "deferred"}})
    jobs = [job("11", "train"), job("12", "cooldown.train", 0)]
    (orphan,) = find_orphans(jobs, tasks, {})
    assert orphan.job_id == "11" and orphan.reason == f"its task oellm__s__e / {RUN} / train is {state}"


@pytest.mark.parametrize("state", ["deferred", "running", "queued", "scheduled", "up_for_retry", "restarting"])
def test_a_job_whose_task_runs_or_will_run_again_is_kept(state):
    tasks = task_instances("oellm__s__e", {RUN: {"train": state}})
    assert find_orphans([job("11", "train")], tasks, {}) == []


def test_an_earlier_tries_job_belongs_to_the_task_whatever_its_try():
    tasks = task_instances("oellm__s__e", {RUN: {"train": "failed"}})
    assert [o.job_id for o in find_orphans([job("11", "train", try_number=3)], tasks, {})] == ["11"]


def test_a_reset_task_is_an_owner_only_while_its_dag_run_goes_on():
    tasks = task_instances("oellm__s__e", {RUN: {"train": None}})
    jobs = [job("11", "train")]
    assert find_orphans(jobs, tasks, {("oellm__s__e", RUN): "running"}) == []
    assert find_orphans(jobs, tasks, {}) == []  # unknown: kept
    (orphan,) = find_orphans(jobs, tasks, {("oellm__s__e", RUN): "failed"})
    assert "reset in a DAG run that is failed" in orphan.reason


def test_ended_completing_foreign_and_unknown_jobs_are_left_alone():
    tasks = task_instances("oellm__s__e", {RUN: {"train": "failed"}})
    jobs = [
        job("11", "train", state="COMPLETED"),
        job("12", "train", state="COMPLETING"),
        JobStatus("13", JobState.RUNNING, comment="someone else's"),
        JobStatus("14", JobState.RUNNING, comment=None),
        job("15", "evaluate"),  # no task instance of that name here
    ]
    assert find_orphans(jobs, tasks, {}) == []
    pending = job("16", "train", state="PENDING")
    assert [o.job_id for o in find_orphans([*jobs, pending], tasks, {})] == ["16"]


names = st.text(st.characters(codec="ascii", exclude_characters="\0"), min_size=1, max_size=12)
states = st.sampled_from([None, "success", "failed", "deferred", "queued", "up_for_retry", "skipped"])


@given(st.dictionaries(names, st.dictionaries(names, states, max_size=4), max_size=3), st.lists(names, max_size=5))
def test_every_orphan_is_a_queued_job_of_a_finished_task(by_run, comments):
    tasks = task_instances("d", by_run)
    jobs = [JobStatus(str(n), JobState.RUNNING, comment=c) for n, c in enumerate(comments)]
    jobs += [
        JobStatus(
            f"t{n}", JobState.RUNNING, comment=JobIdentity("d", t.run_id, t.task_id, t.map_index, 1, "/o").comment
        )
        for n, t in enumerate(tasks)
    ]
    orphans = find_orphans(jobs, tasks, {})
    assert {o.job_id for o in orphans} == {f"t{n}" for n, t in enumerate(tasks) if t.state in FINISHED_TASK_STATES}
