"""Reading the dashboard's records from Airflow's metadata database: a handful of queries per page,
whatever the number of experiments (no SSH, no per-experiment round trip)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from airflow.models.dag import DagModel, DagTag
from airflow.models.dagrun import DagRun
from airflow.models.task_state_store import TaskStateStoreModel
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from sqlalchemy import ColumnElement, and_, func, or_, select
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
    TRACKING_KEY,
    TRAIN_TASK,
    parse_sweep_tag,
)
from airflow_oellm.dashboard.model import EVALUATE_TASKS, RunRecord, TaskRecord

# (task, key) pairs the dashboard reads; a task's other XComs (big or irrelevant) stay in the database
XCOM_KEYS = (RETURN_KEY, RESULT_KEY, PROGRESS_KEY, CONFIG_KEY, COOLDOWNS_KEY, PLANNED_RECORD, TRACKING_KEY)
XCOM_TASKS = (PREPARE_TASK, TRAIN_TASK, COOLDOWN_TRAIN_TASK, *EVALUATE_TASKS)
# what a row's status reads (model.experiment_status) of the training's and prepare's XComs: (task, key) -> JSON
# paths, read in the database, so that sorting and counting a big sweep's experiments loads no loss curve, log or
# config. Airflow 3's tasks store an XCom as a JSON document; in one stored as a JSON string (XComModel.set's own
# serialization, which no task uses) no path finds a field: its row sorts and counts as without them.
_SUMMARY = (("summary", "last_iteration"), ("summary", "train_iters"), ("summary", "last_loss"))
_ENDED = (("last_iteration",), ("final_state",), ("classification",), *_SUMMARY)
STATUS_FIELDS = {
    (TRAIN_TASK, PROGRESS_KEY): (("job_id",), ("job_state",), ("updated",), ("queue",), *_SUMMARY),
    (TRAIN_TASK, RETURN_KEY): _ENDED,
    (TRAIN_TASK, RESULT_KEY): _ENDED,
    (PREPARE_TASK, CONFIG_KEY): (("experiment", "name"), ("backend", "args", "train_iters")),
}
# the XComs a run's live report is made from (model.live_report): the config, the cooldowns, the results
REPORT_XCOMS = (
    (PREPARE_TASK, CONFIG_KEY),
    (PREPARE_TASK, COOLDOWNS_KEY),
    *((task, key) for task in (TRAIN_TASK, COOLDOWN_TRAIN_TASK) for key in (RETURN_KEY, RESULT_KEY)),
)


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


def run_statuses(session: Session, latest: Mapping[str, tuple[int, str, str]]) -> dict[str, RunRecord]:
    """DAG id -> a light record of its latest run (`latest`: latest_runs): the training's task and the fields of
    STATUS_FIELDS; whatever the number of runs, four queries: the tasks, then the XComs of each set of fields."""
    records = {pk: RunRecord(dag_id, run_id, state or "queued") for dag_id, (pk, run_id, state) in latest.items()}
    if not records:
        return {}
    trains = session.execute(
        select(DagRun.id, TaskInstance.state, TaskInstance.try_number, TaskInstance.max_tries)
        .join(DagRun, and_(DagRun.dag_id == TaskInstance.dag_id, DagRun.run_id == TaskInstance.run_id))
        .where(DagRun.id.in_(list(records)), TaskInstance.task_id == TRAIN_TASK, TaskInstance.map_index == -1)
    )
    for pk, state, tries, max_tries in trains:
        records[pk].tasks.append(TaskRecord(TRAIN_TASK, -1, state, tries or 0, max_tries or 0))
    kinds: dict[tuple[tuple[str, ...], ...], list[tuple[str, str]]] = {}
    for pair, paths in STATUS_FIELDS.items():
        kinds.setdefault(paths, []).append(pair)
    for paths, pairs in kinds.items():  # a query each: a row carries its own fields only
        fields = session.execute(
            select(XComModel.dag_run_id, XComModel.task_id, XComModel.key, *(XComModel.value[p] for p in paths)).where(
                XComModel.dag_run_id.in_(list(records)), XComModel.map_index == -1, _any_of(pairs)
            )
        )
        for pk, task_id, key, *values in fields:
            records[pk].xcoms[(task_id, -1, key)] = _nested(zip(paths, values, strict=True))
    return {r.dag_id: r for r in records.values()}


def _any_of(pairs: Collection[tuple[str, str]]) -> ColumnElement[bool]:
    """An XCom of one of these (task, key)."""
    return or_(*(and_(XComModel.task_id == task_id, XComModel.key == key) for task_id, key in pairs))


def _nested(found: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """{"summary": {"last_loss": 3.1}} from (("summary", "last_loss"), 3.1); a field not there is left out."""
    value: dict[str, Any] = {}
    for path, leaf in found:
        if leaf is not None:
            node = value
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = leaf
    return value


def report_versions(session: Session, run_pks: Collection[int]) -> dict[int, tuple[int, Any]]:
    """Run pk -> how many of the XComs its live report is made from (REPORT_XCOMS) there are, and when the last
    of them was written: a task writes an XCom anew, never in place, so any change changes one or the other.
    One query, no value read."""
    versions: dict[int, tuple[int, Any]] = dict.fromkeys(run_pks, (0, None))
    if not versions:
        return {}
    rows = session.execute(
        select(XComModel.dag_run_id, func.count(), func.max(XComModel.timestamp))
        .where(XComModel.dag_run_id.in_(list(versions)), _any_of(REPORT_XCOMS))
        .group_by(XComModel.dag_run_id)
    )
    for pk, count, newest in rows:
        versions[pk] = (count, newest)
    return versions


def report_records(session: Session, run_pks: Collection[int]) -> dict[int, RunRecord]:
    """Run pk -> a record of the XComs its live report is made from (REPORT_XCOMS): one query."""
    records: dict[int, RunRecord] = {}
    if not run_pks:
        return records
    rows = session.execute(
        select(
            XComModel.dag_run_id,
            XComModel.dag_id,
            XComModel.run_id,
            XComModel.task_id,
            XComModel.map_index,
            XComModel.key,
            XComModel.value,
        ).where(XComModel.dag_run_id.in_(list(run_pks)), _any_of(REPORT_XCOMS))
    )
    for pk, dag_id, run_id, task_id, map_index, key, value in rows:
        record = records.setdefault(pk, RunRecord(dag_id, run_id, ""))
        record.xcoms[(task_id, map_index, key)] = _loaded(value)
    return records


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
