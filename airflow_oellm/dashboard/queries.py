"""Reading the dashboard's records from Airflow's metadata database: a handful of queries per page,
whatever the number of experiments (no SSH, no per-experiment round trip)."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from airflow.models.dag import DagModel, DagTag
from airflow.models.dagrun import DagRun
from airflow.models.task_state_store import TaskStateStoreModel
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from airflow_oellm.config.budget import PLANNED_RECORD
from airflow_oellm.config.naming import (
    CONFIG_DIFF_KEY,
    CONFIG_KEY,
    COOLDOWN_TRAIN_TASK,
    COOLDOWNS_KEY,
    HISTORY_KEY,
    PREPARE_TASK,
    PROGRESS_KEY,
    RESULT_KEY,
    RETURN_KEY,
    SCRIPT_KEY_PREFIX,
    SWEEP_DAG_TAG,
    SWEEP_TAG_PREFIX,
    TRAIN_TASK,
    parse_sweep_tag,
)
from airflow_oellm.dashboard.model import EVALUATE_TASKS, RunRecord, TaskRecord

# (task, key) pairs the dashboard reads; a task's other XComs (big or irrelevant) stay in the database
XCOM_KEYS = (RETURN_KEY, RESULT_KEY, PROGRESS_KEY, CONFIG_KEY, COOLDOWNS_KEY, PLANNED_RECORD)
XCOM_TASKS = (PREPARE_TASK, TRAIN_TASK, COOLDOWN_TRAIN_TASK, *EVALUATE_TASKS)


def sweeps(session: Session, allowed: Collection[str] | None) -> dict[str, list[str]]:
    """Sweep name -> its experiment DAG ids (active DAGs the user may read), in id order."""
    tags = session.execute(
        select(DagTag.dag_id, DagTag.name)
        .join(DagModel, DagModel.dag_id == DagTag.dag_id)
        .where(DagModel.is_stale.is_(False), DagTag.name.startswith(SWEEP_TAG_PREFIX) | (DagTag.name == SWEEP_DAG_TAG))
    ).all()
    runners = {dag_id for dag_id, name in tags if name == SWEEP_DAG_TAG}
    found: dict[str, list[str]] = {}
    for dag_id, name in sorted(tags):
        if name == SWEEP_DAG_TAG or dag_id in runners or (allowed is not None and dag_id not in allowed):
            continue
        found.setdefault(parse_sweep_tag(name) or "", []).append(dag_id)
    return dict(sorted(found.items()))


def latest_runs(session: Session, dag_ids: Collection[str]) -> dict[str, tuple[int, str, str]]:
    """DAG id -> (run pk, run id, state) of its newest run."""
    if not dag_ids:
        return {}
    newest = (
        select(func.max(DagRun.id)).where(DagRun.dag_id.in_(list(dag_ids))).group_by(DagRun.dag_id).scalar_subquery()
    )
    rows = session.execute(select(DagRun.dag_id, DagRun.id, DagRun.run_id, DagRun._state).where(DagRun.id.in_(newest)))
    return {dag_id: (pk, run_id, state) for dag_id, pk, run_id, state in rows}


def run_states(session: Session, dag_ids: Collection[str]) -> dict[str, str]:
    """DAG id -> state of its newest run (the sweeps page needs nothing more)."""
    return {dag_id: state for dag_id, (_, _, state) in latest_runs(session, dag_ids).items()}


def run_records(session: Session, run_pks: Collection[int]) -> dict[int, RunRecord]:
    """Run pk -> its record (tasks, the dashboard's XComs, attempt histories): four queries in all."""
    if not run_pks:
        return {}
    pks = list(run_pks)
    records = {
        pk: RunRecord(dag_id, run_id, state or "queued", start, end)
        for pk, dag_id, run_id, state, start, end in session.execute(
            select(DagRun.id, DagRun.dag_id, DagRun.run_id, DagRun._state, DagRun.start_date, DagRun.end_date).where(
                DagRun.id.in_(pks)
            )
        )
    }
    by_run = {(r.dag_id, r.run_id): r for r in records.values()}
    tasks = session.execute(
        select(
            TaskInstance.dag_id,
            TaskInstance.run_id,
            TaskInstance.task_id,
            TaskInstance.map_index,
            TaskInstance.state,
            TaskInstance.try_number,
            TaskInstance.max_tries,
            TaskInstance.start_date,
            TaskInstance.end_date,
            TaskInstance._rendered_map_index,
        ).where(
            TaskInstance.dag_id.in_({r.dag_id for r in records.values()}),
            TaskInstance.run_id.in_({r.run_id for r in records.values()}),
        )
    )
    for dag_id, run_id, task_id, map_index, state, tries, max_tries, start, end, label in tasks:
        record = by_run.get((dag_id, run_id))
        if record is not None:
            record.tasks.append(TaskRecord(task_id, map_index, state, tries or 0, max_tries or 0, start, end, label))
    xcoms = session.execute(
        select(XComModel.dag_run_id, XComModel.task_id, XComModel.map_index, XComModel.key, XComModel.value).where(
            XComModel.dag_run_id.in_(pks), XComModel.task_id.in_(XCOM_TASKS), XComModel.key.in_(XCOM_KEYS)
        )
    )
    for row in xcoms:
        records[row.dag_run_id].xcoms[(row.task_id, row.map_index, row.key)] = _loaded(row.value)
    histories = session.execute(
        select(
            TaskStateStoreModel.dag_run_id,
            TaskStateStoreModel.task_id,
            TaskStateStoreModel.map_index,
            TaskStateStoreModel.value,
        ).where(TaskStateStoreModel.dag_run_id.in_(pks), TaskStateStoreModel.key == HISTORY_KEY)
    )
    for pk, task_id, map_index, value in histories:
        records[pk].histories[(task_id, map_index)] = _loaded(value)
    return records


def add_details(session: Session, pk: int, record: RunRecord) -> None:
    """What only the experiment page shows, into its run's record: the config's differences from the sweep's
    base and the job script of every try of the trainings (two queries)."""
    diff = session.scalar(
        select(XComModel.value).where(
            XComModel.dag_run_id == pk,
            XComModel.task_id == PREPARE_TASK,
            XComModel.map_index == -1,
            XComModel.key == CONFIG_DIFF_KEY,
        )
    )
    if diff is not None:
        record.xcoms[(PREPARE_TASK, -1, CONFIG_DIFF_KEY)] = _loaded(diff)
    scripts = session.execute(
        select(
            TaskStateStoreModel.task_id,
            TaskStateStoreModel.map_index,
            TaskStateStoreModel.key,
            TaskStateStoreModel.value,
        ).where(
            TaskStateStoreModel.dag_run_id == pk,
            TaskStateStoreModel.task_id.in_([TRAIN_TASK, COOLDOWN_TRAIN_TASK]),
            TaskStateStoreModel.key.startswith(SCRIPT_KEY_PREFIX),
        )
    )
    for task_id, map_index, key, value in scripts:
        try_number = key.removeprefix(SCRIPT_KEY_PREFIX)
        if try_number.isdigit():
            script = _loaded(value)
            record.scripts[(task_id, map_index, int(try_number))] = script if isinstance(script, str) else str(value)


def _loaded(value: Any) -> Any:
    """A stored JSON value. The keys read here hold plain JSON (the operators write dicts, lists, numbers
    and strings), so the standard decoder does what Airflow's XCom decoder would, five times faster."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return None


def dag_runs(session: Session, dag_id: str, limit: int = 20) -> list[tuple[int, str, str]]:
    """(pk, run id, state) of a DAG's newest runs, newest first."""
    rows = session.execute(
        select(DagRun.id, DagRun.run_id, DagRun._state)
        .where(DagRun.dag_id == dag_id)
        .order_by(DagRun.id.desc())
        .limit(limit)
    )
    return [tuple(r) for r in rows]


def dag_sweep(session: Session, dag_id: str) -> str | None:
    """The sweep an experiment DAG belongs to."""
    tag = select(DagTag.name).where(DagTag.dag_id == dag_id, DagTag.name.startswith(SWEEP_TAG_PREFIX))
    name = session.scalar(tag)
    return parse_sweep_tag(name) if name else None
