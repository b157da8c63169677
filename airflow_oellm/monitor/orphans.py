"""Orphaned jobs: jobs in the queue that no task will ever follow again.

A deferred task marked failed (or success) while no triggerer runs its trigger, or a DAG run marked failed
then, never reaches the trigger's `on_kill`: its job would train on unobserved. The reconcile task lists the
jobs in the queue that carry this provider's comment, matches each to the task instance that submitted it
(the comment's task key hashes dag_id, run_id, task_id and map_index) and calls it orphaned when that task
instance has finished, or was reset in a finished DAG run. A task that will run again (queued, up for retry,
cleared in a running DAG run) is no orphan's owner: its next try adopts the job.

A job whose task key matches no task instance of the DAGs asked about is left alone: it may belong to
another deployment, a DAG not loaded here, or a run deleted from the database (see docs/reliability.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from airflow_oellm.slurm.identity import parse_comment, task_key
from airflow_oellm.slurm.states import JobState, JobStatus

# Airflow's task instance states after which the task does not run again unless someone clears it
FINISHED_TASK_STATES = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})
FINISHED_RUN_STATES = frozenset({"success", "failed"})
_MAPPED_KEY = re.compile(r"^(?P<task_id>.+)_(?P<map_index>\d+)$")


@dataclass(frozen=True)
class TaskInstanceRef:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    state: str | None

    @property
    def key(self) -> str:
        return task_key(self.dag_id, self.run_id, self.task_id, self.map_index)

    def describe(self) -> str:
        index = "" if self.map_index < 0 else f"[{self.map_index}]"
        return f"{self.dag_id} / {self.run_id} / {self.task_id}{index}"


def state_key(task_id: str, map_index: int) -> str:
    """A task instance's key in Airflow's task-states answer: its task id, `<task_id>_<map_index>` if mapped."""
    return task_id if map_index < 0 else f"{task_id}_{map_index}"


def task_instances(dag_id: str, states_by_run: Mapping[str, Mapping[str, str | None]]) -> list[TaskInstanceRef]:
    """Airflow's task-states answer (`{run_id: {task_id or <task_id>_<map_index>: state}}`) as task instances.

    `x_3` is either task `x_3` or instance 3 of mapped task `x`: both are kept, and the wrong reading
    matches no job's task key.
    """
    refs: list[TaskInstanceRef] = []
    for run_id, states in states_by_run.items():
        for name, state in states.items():
            refs.append(TaskInstanceRef(dag_id, run_id, name, -1, state))
            mapped = _MAPPED_KEY.match(name)
            if mapped:
                refs.append(TaskInstanceRef(dag_id, run_id, mapped["task_id"], int(mapped["map_index"]), state))
    return refs


@dataclass(frozen=True)
class Orphan:
    job_id: str
    task: TaskInstanceRef
    reason: str


def queued_task_keys(jobs: Iterable[JobStatus]) -> dict[str, list[JobStatus]]:
    """The jobs that carry this provider's comment and still hold (or wait for) nodes, by task key (a
    completing job is ending already)."""
    found: dict[str, list[JobStatus]] = {}
    for job in jobs:
        identity = parse_comment(job.comment)
        if identity is not None and job.state.is_active and job.state is not JobState.COMPLETING:
            found.setdefault(identity.task_key, []).append(job)
    return found


def find_orphans(
    jobs: Sequence[JobStatus],
    tasks: Iterable[TaskInstanceRef],
    run_states: Mapping[tuple[str, str], str | None],
) -> list[Orphan]:
    """The active jobs of `jobs` whose task instance (among `tasks`) will not follow them again.

    `run_states`: the state of each (dag_id, run_id) that has a task instance without a state (reset by a
    clear); a missing entry counts as a DAG run that goes on.
    """
    queued = queued_task_keys(jobs)
    orphans: list[Orphan] = []
    for task in tasks:
        for job in queued.get(task.key, ()):
            run_state = run_states.get((task.dag_id, task.run_id))
            if task.state in FINISHED_TASK_STATES:
                reason = f"its task {task.describe()} is {task.state}"
            elif task.state is None and run_state in FINISHED_RUN_STATES:
                reason = f"its task {task.describe()} was reset in a DAG run that is {run_state}"
            else:
                continue
            orphans.append(Orphan(job.job_id, task, reason))
    return orphans
