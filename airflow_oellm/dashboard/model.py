"""What the dashboard shows, assembled from what the operators record: no Airflow import, no I/O.

Input: one `RunRecord` per experiment DAG run (its task instances, their XComs and attempt histories,
as the plugin reads them from Airflow's database). Output: `ExperimentView`s (state, progress, loss,
evaluation, GPU-hours, ETA, curves, timeline) and a `SweepView` over them.
"""

from __future__ import annotations

import bisect
import difflib
import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from airflow_oellm.analysis.measurements import run_settings
from airflow_oellm.analysis.runs import run_rows, run_scales
from airflow_oellm.config.budget import PLANNED_RECORD
from airflow_oellm.config.errors import ConfigError
from airflow_oellm.config.naming import (
    CHECKPOINT_EVALUATE_TASK,
    CONFIG_DIFF_KEY,
    CONFIG_KEY,
    COOLDOWN_EVALUATE_TASK,
    COOLDOWN_TRAIN_TASK,
    COOLDOWNS_KEY,
    PREPARE_TASK,
    PROGRESS_KEY,
    RESULT_KEY,
    RETURN_KEY,
    TRACKING_KEY,
    TRAIN_TASK,
    experiment_name,
)
from airflow_oellm.dashboard.plot import downsampled
from airflow_oellm.monitor.accounting import running_gpu_hours_estimate, used_gpu_hours
from airflow_oellm.monitor.classify import STOPPED
from airflow_oellm.monitor.outage import outage_line
from airflow_oellm.monitor.records import AttemptHistory, AttemptRecord
from airflow_oellm.monitor.watch import loss_at, merged_curve, validation_losses
from airflow_oellm.slurm.pending import pending_counts

EVALUATE_TASKS = {CHECKPOINT_EVALUATE_TASK: False, COOLDOWN_EVALUATE_TASK: True}  # task -> is a cooldown's
NEVER_RUN = "never run"
CURVE_POINTS = 200  # per run, whatever its length: what a plot can show
SWEEP_CURVE_POINTS = 100  # per run on a sweep page, whose 50 experiments' curves are most of its bytes
SORTS = ("name", "state", "loss", "progress")
# sort=state: what needs a look first; a state not listed comes after these
STATE_ORDER = ("failed", "retrying", "running", "queued", "stopped early", "success", NEVER_RUN)
PER_PAGE = 50
MAX_PER_PAGE = 200
MAX_SELECTED = 20  # experiments drawn at once beside a page: each costs its whole record and its curves
LOSS_BINS = 20  # of the loss distribution over a sweep's experiments
PROGRESS_BINS = 10  # of the progress distribution: tenths of the training
# a progress snapshot older than this (seconds, beyond its poll interval) is shown as stale
STALE_AFTER = 300.0


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    max_tries: int
    start: datetime | None = None
    end: datetime | None = None
    label: str | None = None  # the UI's rendered map index


@dataclass
class RunRecord:
    dag_id: str
    run_id: str
    state: str
    start: datetime | None = None
    end: datetime | None = None
    tasks: list[TaskRecord] = field(default_factory=list)
    xcoms: dict[tuple[str, int, str], Any] = field(default_factory=dict)  # (task_id, map_index, key) -> value
    histories: dict[tuple[str, int], Any] = field(default_factory=dict)  # (task_id, map_index) -> attempts
    # the experiment page's alone (queries.add_details): (task_id, map_index, try) -> the job script it submitted
    scripts: dict[tuple[str, int, int], str] = field(default_factory=dict)
    _parsed: dict[tuple[str, int], list[AttemptRecord]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def xcom(self, task_id: str, key: str = RETURN_KEY, map_index: int = -1) -> Any:
        return self.xcoms.get((task_id, map_index, key))

    def task(self, task_id: str, map_index: int = -1) -> TaskRecord | None:
        return next((t for t in self.tasks if t.task_id == task_id and t.map_index == map_index), None)

    def attempts(self, task_id: str, map_index: int = -1) -> list[AttemptRecord]:
        """The task's attempts in try order: its history in the task state store, else those its result
        carries. Read once per task: a page asks several times."""
        key = (task_id, map_index)
        if key not in self._parsed:
            history = AttemptHistory.from_dict(self.histories.get(key))
            if not history.attempts:
                history = AttemptHistory.of_result(self.result(task_id, map_index))
            self._parsed[key] = sorted(history.attempts, key=lambda a: a.try_number)
        return self._parsed[key]

    def result(self, task_id: str, map_index: int = -1) -> Mapping[str, Any] | None:
        """A submit task's result: its return value, or the `result` it leaves when it fails."""
        for key in (RETURN_KEY, RESULT_KEY):
            value = self.xcom(task_id, key, map_index)
            if isinstance(value, Mapping) and value:
                return value
        return None


@dataclass(frozen=True)
class Curve:
    run: str  # the experiment, or one of its cooldowns
    points: list[tuple[float, float]]  # (iteration, loss)
    tokens_per_iteration: float | None = None
    parent: str | None = None  # a cooldown's experiment: drawn from the parent's point
    group: str = ""  # the experiment a curve belongs to (one colour per experiment)
    discarded: bool = False  # what a rewind threw away: drawn greyed
    marks: list[tuple[float, float, str]] = field(default_factory=list)  # (iteration, loss, what): rewinds


@dataclass(frozen=True)
class TimelineEntry:
    time: float | None
    kind: str  # submit | end | retry | fault | checkpoint | task
    text: str


@dataclass(frozen=True)
class JobScript:
    """The job script one try of a training submitted."""

    label: str  # "training try 2"
    job_id: str | None
    script: str
    previous: int | None = None  # the try its changes are against (None: the first try kept)
    changes: list[str] = field(default_factory=list)  # a unified diff against that try's script


@dataclass
class ExperimentView:
    dag_id: str
    name: str
    state: str
    run_id: str | None = None
    attempt: int | None = None
    max_attempts: int | None = None
    job_state: str | None = None
    iteration: int | None = None
    train_iters: int | None = None
    loss: float | None = None
    eval_name: str | None = None
    eval_value: float | None = None
    eval_iteration: int | None = None
    gpu_hours: float = 0.0
    planned_gpu_hours: float | None = None  # the run's plan: every job at its limit, every attempt
    eta_seconds: float | None = None
    updated: float | None = None
    stale: bool = False
    outage: str | None = None  # the training's watch cannot reach the cluster: since when and why
    outage_advice: str | None = None
    stopped_early: str | None = None  # the sweep's early stopping stopped its training: why
    queue: dict[str, Any] | None = None  # its job pends: why, until when (slurm/pending.QueueState.to_dict)
    log_tail: list[str] = field(default_factory=list)  # the running job's last log lines, as its watch read them
    log_job: str | None = None  # whose
    curves: list[Curve] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # run, iteration, validation_loss, metrics
    timeline: list[TimelineEntry] = field(default_factory=list)
    # the experiment page's alone: {"sweep": its differences from the sweep's base, "run": the run's changes}
    config_diff: dict[str, Any] | None = None
    # the W&B run and TensorBoard directory of its training, then of each cooldown (config/tracking.tracking_record)
    tracking: list[dict[str, Any]] = field(default_factory=list)
    scripts: list[JobScript] = field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        if self.iteration is None or not self.train_iters:
            return None
        return max(0.0, min(1.0, self.iteration / self.train_iters))


@dataclass(frozen=True)
class SweepRequest:
    """What a sweep page shows: the `page` (from 1) of `per_page` rows in `sort` order (a key of SORTS, `-`
    before it for descending), and the `selected` experiments (DAG ids) whose curves it draws instead of the
    page's."""

    sort: str = "name"
    page: int = 1
    per_page: int = PER_PAGE
    selected: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepPage:
    """Which experiments a sweep page shows in whole: every experiment's status in the page's order (from light
    records), the request with its page within the pages there are and its selection within the sweep."""

    name: str
    statuses: list[ExperimentView]
    request: SweepRequest

    @property
    def total(self) -> int:
        return len(self.statuses)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.request.per_page))

    @property
    def first(self) -> int:
        """The index of the page's first row among all."""
        return (self.request.page - 1) * self.request.per_page

    @property
    def rows(self) -> list[str]:
        """The DAG ids of the page's rows, in order."""
        return [s.dag_id for s in self.statuses[self.first : self.first + self.request.per_page]]

    @property
    def wanted(self) -> list[str]:
        """The experiments whose whole records the page needs: its rows and the selected ones."""
        return list(dict.fromkeys([*self.rows, *self.request.selected]))


@dataclass
class SweepView:
    name: str
    page: SweepPage
    experiments: list[ExperimentView]  # the page's rows, whole
    selected: list[ExperimentView]  # the selected experiments, whole: drawn instead of the rows
    analysis: dict[str, Any] | None = None  # analysis/sweep.analyse_reports of the runs so far (live_analysis)

    @property
    def statuses(self) -> list[ExperimentView]:
        """Every experiment of the sweep, on this page or not, in the page's order."""
        return self.page.statuses

    @property
    def drawn(self) -> list[ExperimentView]:
        """The experiments whose curves and evaluations the page shows: the selected ones, else its rows."""
        return self.selected or self.experiments

    @property
    def counts(self) -> dict[str, int]:
        return state_counts(e.state for e in self.statuses)

    @property
    def pending(self) -> dict[str, int]:
        """Jobs pending per SLURM reason, most first."""
        return pending_counts(e.queue for e in self.statuses)

    @property
    def metric_columns(self) -> list[str]:
        return sorted({m for e in self.drawn for row in e.evaluations for m in row["metrics"]})

    @property
    def distributions(self) -> dict[str, Any]:
        return distributions(self.statuses)


def state_counts(states: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return dict(sorted(counts.items()))


def _progress(run: RunRecord, task_id: str, map_index: int = -1) -> Mapping[str, Any]:
    return run.xcom(task_id, PROGRESS_KEY, map_index) or {}


def _running(run: RunRecord, task_id: str, map_index: int = -1) -> bool:
    task = run.task(task_id, map_index)
    return task is not None and task.state in ("deferred", "running", "queued", "scheduled", "up_for_reschedule")


def run_curve(
    run: RunRecord, task_id: str, map_index: int = -1, curve_points: int = CURVE_POINTS
) -> list[tuple[float, float]]:
    """Every attempt's loss points, then the running attempt's (its progress) or the final result's; without
    what rewinds discarded (`rewound_curves`)."""
    return rewound_curves(run, task_id, map_index, curve_points)[0]


def rewound_curves(
    run: RunRecord, task_id: str, map_index: int = -1, curve_points: int = CURVE_POINTS
) -> tuple[list[tuple[float, float]], list[tuple[dict[str, Any], list[Any]]]]:
    """The training's loss curve, and each rewind with the points it discarded (AttemptHistory.rewound_curves),
    each downsampled to at most `curve_points`. The result's and the progress's points belong to the latest job:
    left out when that job was rewound."""
    kept, rewinds = AttemptHistory(tuple(run.attempts(task_id, map_index))).rewound_curves()
    curves: list[Any] = [*kept, *(s.get("loss_curve") for s in _unrewound_summaries(run, task_id, map_index))]
    discarded = [(rewind, downsampled(points, curve_points)) for rewind, points in rewinds]
    return downsampled(merged_curve(curves), curve_points), discarded


def _unrewound_summaries(run: RunRecord, task_id: str, map_index: int = -1) -> list[Mapping[str, Any]]:
    """The result's and the progress's summaries, of the latest job; without one whose job was rewound (its
    record holds what is kept of it)."""
    rewound_jobs = {a.job_id for a in run.attempts(task_id, map_index) if a.rewind}
    result, progress = run.result(task_id, map_index) or {}, _progress(run, task_id, map_index)
    latest = (
        ((result.get("job_ids") or [None])[-1], result.get("summary")),
        (progress.get("job_id"), progress.get("summary")),
    )
    return [summary or {} for job, summary in latest if job not in rewound_jobs]


def _latest_summary(run: RunRecord, task_id: str, map_index: int = -1) -> Mapping[str, Any]:
    """The running attempt's summary if the task still runs, else its final one."""
    progress = _progress(run, task_id, map_index).get("summary")
    final = (run.result(task_id, map_index) or {}).get("summary")
    if _running(run, task_id, map_index):
        return progress or final or {}
    return final or progress or {}


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _gpus(config: Mapping[str, Any]) -> float:
    slurm = config.get("slurm") or {}
    return float(slurm.get("nodes") or 1) * float(slurm.get("gpus_per_node") or 0)


def run_gpu_hours_so_far(run: RunRecord, config: Mapping[str, Any], now: float) -> float:
    """GPU-hours every ended attempt of every job used, plus an estimate for jobs still running (with
    the GPUs the running job holds, as its submission recorded; the experiment's for older records)."""
    total = 0.0
    keys = {(t.task_id, t.map_index) for t in run.tasks} | set(run.histories)
    for task_id, map_index in keys:
        attempts = run.attempts(task_id, map_index)
        total += used_gpu_hours(a.gpu_hours for a in attempts)
        progress = _progress(run, task_id, map_index)
        summary = progress.get("summary") or {}
        since = _number(summary.get("running_since"))
        finished = {a.job_id for a in attempts if a.end}
        if (
            since
            and progress.get("job_state") == "RUNNING"
            and _running(run, task_id, map_index)
            and progress.get("job_id") not in finished
        ):
            current = next((a for a in attempts if a.job_id == progress.get("job_id")), None)
            gpus = _number(current.gpus) if current else None
            total += running_gpu_hours_estimate(since, now, _gpus(config) if gpus is None else gpus)
    return round(total, 3)


def _tokens_per_iteration(config: Mapping[str, Any], summary: Mapping[str, Any]) -> float | None:
    args = (config.get("backend") or {}).get("args") or {}
    batch = _number(summary.get("global_batch_size")) or _number(args.get("global_batch_size"))
    seq = _number(args.get("seq_length"))
    return batch * seq if batch and seq else None


def evaluations(run: RunRecord, name: str) -> list[dict[str, Any]]:
    """Rows (run, iteration, validation_loss, metrics) per evaluated or validated checkpoint."""
    prepared = run.xcom(PREPARE_TASK) or []
    cooldowns = run.xcom(PREPARE_TASK, COOLDOWNS_KEY) or []
    rows: dict[tuple[str, int], dict[str, Any]] = {}

    def row(run_name: str, iteration: int) -> dict[str, Any]:
        return rows.setdefault(
            (run_name, iteration), {"run": run_name, "iteration": iteration, "validation_loss": None, "metrics": {}}
        )

    for task_id, is_cooldown in EVALUATE_TASKS.items():
        for task in run.tasks:
            if task.task_id != task_id:
                continue
            metrics = (run.xcom(task_id, RETURN_KEY, task.map_index) or {}).get("metrics") or {}
            if not metrics:
                continue
            if is_cooldown:
                spec = cooldowns[task.map_index] if task.map_index < len(cooldowns) else {}
                run_name, iteration = spec.get("name", f"cooldown {task.map_index}"), spec.get("final_iteration")
            else:
                spec = prepared[task.map_index] if task.map_index < len(prepared) else {}
                cooldown = spec.get("cooldown")
                run_name = name if cooldown is None else cooldowns[cooldown]["name"]
                iteration = spec.get("iteration")
            if iteration is None:
                continue
            target = row(run_name, int(iteration))
            for suite, values in metrics.items():
                for metric, value in (values or {}).items():
                    if _number(value) is not None:
                        target["metrics"][f"{suite}.{metric}"] = _number(value)
    runs = [(name, TRAIN_TASK, -1)] + [(c.get("name", ""), COOLDOWN_TRAIN_TASK, i) for i, c in enumerate(cooldowns)]
    for run_name, task_id, map_index in runs:
        sources = [s.get("validation") for s in _unrewound_summaries(run, task_id, map_index)]
        sources += AttemptHistory(tuple(run.attempts(task_id, map_index))).rewound_validation()
        for iteration, loss in validation_losses(sources).items():
            row(run_name, iteration)["validation_loss"] = _number(loss)
    return sorted(rows.values(), key=lambda r: (r["run"] != name, r["run"], r["iteration"]))


def _when(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def trainings(run: RunRecord) -> list[tuple[str, int, str]]:
    """(task id, map index, label) of the run's training and its cooldowns."""
    cooldowns = run.xcom(PREPARE_TASK, COOLDOWNS_KEY) or []
    return [(TRAIN_TASK, -1, "training")] + [
        (COOLDOWN_TRAIN_TASK, i, f"cooldown {c.get('name', i)}") for i, c in enumerate(cooldowns)
    ]


def job_scripts(run: RunRecord) -> list[JobScript]:
    """Each training try's job script, the later ones with what changed since the try before."""
    found = []
    for task_id, map_index, label in trainings(run):
        jobs = {a.try_number: a.job_id for a in run.attempts(task_id, map_index)}
        tries = sorted(t for (task, index, t) in run.scripts if (task, index) == (task_id, map_index))
        for before, now in zip([None, *tries], tries, strict=False):
            script = run.scripts[(task_id, map_index, now)]
            changes = []
            if before is not None:
                earlier = run.scripts[(task_id, map_index, before)].splitlines()
                changes = list(
                    difflib.unified_diff(earlier, script.splitlines(), f"try {before}", f"try {now}", lineterm="")
                )
            found.append(JobScript(f"{label} try {now}", jobs.get(now), script, before, changes))
    return found


def timeline(run: RunRecord) -> list[TimelineEntry]:
    """Submissions, ends with their classification, faults, checkpoints and side tasks, oldest first."""
    entries: list[TimelineEntry] = []
    for task_id, map_index, label in trainings(run):
        for a in run.attempts(task_id, map_index):
            tried = f"{label} try {a.try_number}"
            entries.append(
                TimelineEntry(
                    _number(a.submitted_at),
                    "submit",
                    f"{tried}: job {a.job_id} {a.submission or 'submitted'}"
                    + (f", from checkpoint {a.checkpoint_before}" if a.checkpoint_before else ""),
                )
            )
            for line in a.faults:
                entries.append(TimelineEntry(_iso(a.end), "fault", f"{tried}: {line}"))
            if a.checkpoints_saved:
                saved = ", ".join(str(c) for c in a.checkpoints_saved)
                entries.append(TimelineEntry(_iso(a.end), "checkpoint", f"{tried}: checkpoints saved at {saved}"))
            if a.verdict:
                kind = {"retry": "retry", "fatal": "fault"}.get(a.verdict, "end")
                entries.append(
                    TimelineEntry(
                        _iso(a.end),
                        kind,
                        f"{tried}: job {a.job_id}{f' on {a.nodes}' if a.nodes else ''} ended {a.raw_state or a.state}"
                        f" at iteration {a.last_iteration} -> {a.verdict} ({a.reason})",
                    )
                )
            if a.excluded_nodes:
                excluded = ", ".join(a.excluded_nodes)
                entries.append(TimelineEntry(_iso(a.end), "exclude", f"{tried}: later tries avoid {excluded}"))
    for task in run.tasks:
        if task.task_id in (TRAIN_TASK, COOLDOWN_TRAIN_TASK, PREPARE_TASK) or task.state is None:
            continue
        label = f"{task.task_id}[{task.label or task.map_index}]" if task.map_index >= 0 else task.task_id
        if task.end and task.state in ("success", "failed", "skipped", "upstream_failed"):
            tries = f" after {task.try_number} tries" if task.try_number > 1 else ""
            entries.append(TimelineEntry(_when(task.end), "task", f"{label} {task.state}{tries}"))
    return sorted(entries, key=lambda e: (e.time is None, e.time or 0.0))


def _iso(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _job_state(
    run: RunRecord, attempts: Sequence[AttemptRecord], progress: Mapping[str, Any], result: Mapping[str, Any]
) -> str | None:
    """The training job's SLURM state: live while the task waits for it, else how its last job ended
    (a retry's task may still hold its predecessor's progress until it starts)."""
    ended = {a.job_id: a.state for a in attempts if a.verdict}
    if _running(run, TRAIN_TASK) and progress.get("job_id") not in ended:
        return progress.get("job_state")
    if result.get("final_state"):
        return result["final_state"]
    return ended.get(progress.get("job_id")) or (attempts[-1].state if attempts else None)


def experiment_status(dag_id: str, name: str, run: RunRecord | None, now: float) -> ExperimentView:
    """An experiment's state, attempt, progress, loss and queue: what sorting and counting a sweep's experiments
    needs. Read from the training's task, its progress and result summaries and the config's name and length
    alone: all that a light record (queries.run_statuses) holds, and the same rules as `experiment_view`."""
    if run is None:
        return ExperimentView(dag_id=dag_id, name=name, state=NEVER_RUN)
    config = run.xcom(PREPARE_TASK, CONFIG_KEY) or {}
    name = (config.get("experiment") or {}).get("name") or name
    train = run.task(TRAIN_TASK)
    summary = _latest_summary(run, TRAIN_TASK)
    progress = _progress(run, TRAIN_TASK)
    attempts = run.attempts(TRAIN_TASK)
    result = run.result(TRAIN_TASK) or {}
    args = (config.get("backend") or {}).get("args") or {}
    iteration = summary.get("last_iteration")
    if iteration is None:
        iteration = result.get("last_iteration") or next(
            (a.last_iteration or a.checkpoint_after for a in reversed(attempts)), None
        )
    train_iters = summary.get("train_iters") or args.get("train_iters")
    view = ExperimentView(
        dag_id=dag_id,
        name=name,
        state=run.state,
        run_id=run.run_id,
        attempt=train.try_number if train else None,
        max_attempts=train.max_tries + 1 if train else None,
        job_state=_job_state(run, attempts, progress, result),
        iteration=int(iteration) if iteration is not None else None,
        train_iters=int(train_iters) if train_iters else None,
        loss=_number(summary.get("last_loss")),
        updated=_number(progress.get("updated")),
    )
    if train and train.state == "up_for_retry":
        view.state = "retrying"
    judged = result.get("classification") or {}
    if train and train.state == "skipped" and judged.get("verdict") == STOPPED:  # by the sweep: no failure
        view.state, view.stopped_early = "stopped early", str(judged.get("reason", ""))
    if view.job_state == "PENDING" and _running(run, TRAIN_TASK) and isinstance(progress.get("queue"), Mapping):
        view.queue = dict(progress["queue"])
    return view


def experiment_view(
    dag_id: str, name: str, run: RunRecord | None, now: float, curve_points: int = CURVE_POINTS
) -> ExperimentView:
    """One experiment's row: its latest run's state, progress and results; each curve at most `curve_points`."""
    view = experiment_status(dag_id, name, run, now)
    if run is None:
        return view
    name = view.name
    config = run.xcom(PREPARE_TASK, CONFIG_KEY) or {}
    summary = _latest_summary(run, TRAIN_TASK)
    progress = _progress(run, TRAIN_TASK)
    view.gpu_hours = run_gpu_hours_so_far(run, config, now)
    view.planned_gpu_hours = _number((run.xcom(PREPARE_TASK, PLANNED_RECORD) or {}).get("total"))
    if _running(run, TRAIN_TASK) and view.updated is not None:
        view.stale = now - view.updated > STALE_AFTER
    if _running(run, TRAIN_TASK) and isinstance(progress.get("log_tail"), list):
        view.log_tail, view.log_job = [str(line) for line in progress["log_tail"]], progress.get("job_id")
    if _running(run, TRAIN_TASK) and isinstance(progress.get("outage"), Mapping):
        view.outage, view.outage_advice = outage_line(progress["outage"]), str(progress["outage"].get("advice", ""))
    iteration_ms = _number(summary.get("iteration_ms"))
    training = None
    if iteration_ms and view.train_iters:
        training = max(view.train_iters - (view.iteration or 0), 0) * iteration_ms / 1000
    if view.job_state == "RUNNING":
        view.eta_seconds = training
    elif view.queue is not None:
        start = _number(view.queue.get("expected_start"))
        if start is not None and training is not None:  # the wait in the queue, then the rest of the training
            view.eta_seconds = max(start - now, 0.0) + training
    tokens = _tokens_per_iteration(config, summary)
    points, discarded = rewound_curves(run, TRAIN_TASK, curve_points=curve_points)
    marks = []
    for rewind, _ in discarded:
        target = rewind.get("rewind_to") or 0
        what = "loss spike" if rewind.get("anomaly") == "loss_spike" else "NaN loss"
        marks.append((float(target), loss_at(points, target), f"{rewind.get('id')}: {what} at {rewind.get('start')}"))
    view.curves = [Curve(name, points, tokens, group=name, marks=[m for m in marks if m[1] is not None])]
    view.curves += [
        Curve(f"{name}, discarded by {rewind.get('id')}", lost, tokens, group=name, discarded=True)
        for rewind, lost in discarded
    ]
    for index, cooldown in enumerate(run.xcom(PREPARE_TASK, COOLDOWNS_KEY) or []):
        points = run_curve(run, COOLDOWN_TRAIN_TASK, index, curve_points)
        at = cooldown.get("at")
        parent_loss = loss_at(view.curves[0].points, at) if at is not None else None
        if points and parent_loss is not None:
            points = [(float(at), parent_loss), *[p for p in points if p[0] > at]]
        view.curves.append(Curve(cooldown.get("name", f"cooldown {index}"), points, tokens, name, group=name))
    view.evaluations = evaluations(run, name)
    main = [r for r in view.evaluations if r["run"] == name and r["metrics"]]
    if main:
        last = main[-1]
        view.eval_name = sorted(last["metrics"])[0]
        view.eval_value = last["metrics"][view.eval_name]
        view.eval_iteration = last["iteration"]
    view.timeline = timeline(run)
    tracked = run.xcom(PREPARE_TASK, TRACKING_KEY)
    view.tracking = [dict(t) for t in tracked if isinstance(t, Mapping)] if isinstance(tracked, list) else []
    diff = run.xcom(PREPARE_TASK, CONFIG_DIFF_KEY)
    view.config_diff = dict(diff) if isinstance(diff, Mapping) else None
    view.scripts = job_scripts(run)
    return view


def sweep_page(sweep: str, runs: Mapping[str, RunRecord | None], request: SweepRequest, now: float) -> SweepPage:
    """`runs`: experiment DAG id -> its latest run (None if never run), light or whole: each one's status, sorted
    as asked; the page within the pages there are; the selection without what is not in the sweep, at most
    MAX_SELECTED."""
    statuses = sorted_experiments(
        [experiment_status(dag_id, experiment_name(dag_id, sweep), run, now) for dag_id, run in runs.items()],
        request.sort,
    )
    pages = max(1, -(-len(statuses) // request.per_page))
    selected = tuple(dict.fromkeys(d for d in request.selected if d in runs))[:MAX_SELECTED]
    return SweepPage(sweep, statuses, replace(request, page=min(max(request.page, 1), pages), selected=selected))


def sweep_view(
    page: SweepPage, records: Mapping[str, RunRecord | None], reports: Sequence[Mapping[str, Any]], now: float
) -> SweepView:
    """The page's rows and selected experiments in whole, from their `records` (experiment DAG id -> its latest
    run, whole), and the live analysis of every run's report (`reports`, LiveReports)."""
    views = {
        dag_id: experiment_view(
            dag_id, experiment_name(dag_id, page.name), records.get(dag_id), now, SWEEP_CURVE_POINTS
        )
        for dag_id in page.wanted
    }
    names = [s.name for s in sorted(page.statuses, key=lambda s: s.dag_id)]  # the analysis is the sort's whatever
    rows, selected = [views[d] for d in page.rows], [views[d] for d in page.request.selected]
    return SweepView(page.name, page, rows, selected, live_analysis(reports, names))


def sorted_experiments(views: Sequence[ExperimentView], sort: str) -> list[ExperimentView]:
    """`views` in `sort` order (a key of SORTS, `-` before it for descending): those without that value (no loss
    yet, a loss that is not a number) last either way, ties in name order."""
    key = sort.removeprefix("-")
    if key not in SORTS:
        raise ValueError(f"sort by one of {', '.join(SORTS)} (with '-' before it: descending), not {sort!r}")
    by_name = sorted(views, key=lambda v: _sort_value(v, "name"))
    values = {id(v): _sort_value(v, key) for v in views}
    known = [v for v in by_name if values[id(v)] is not None]
    return [
        *sorted(known, key=lambda v: values[id(v)], reverse=sort.startswith("-")),
        *(v for v in by_name if values[id(v)] is None),
    ]


def _sort_value(view: ExperimentView, key: str) -> Any:
    if key == "name":
        return _natural(view.name), view.name, view.dag_id  # lr0.01 and lr0.001 are alike as numbers
    if key == "state":
        return _state_rank(view.state)
    if key == "loss":
        return view.loss if view.loss is not None and math.isfinite(view.loss) else None
    return view.fraction


def _state_rank(state: str) -> tuple[int, str]:
    return (STATE_ORDER.index(state), "") if state in STATE_ORDER else (len(STATE_ORDER), state)


def _natural(name: str) -> list[Any]:
    """A name's sort key with its numbers as numbers: e2 before e10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def distributions(views: Sequence[ExperimentView]) -> dict[str, Any]:
    """How the experiments' latest train losses and progress spread, per state: the counts in LOSS_BINS equal
    bins from the lowest loss to the highest, and in PROGRESS_BINS bins of the training (percent)."""
    losses = [v.loss for v in views if v.loss is not None and math.isfinite(v.loss)]
    loss_edges: list[float] = []
    if losses and max(losses) > min(losses):
        low, high = min(losses), max(losses)
        loss_edges = [low + (high - low) * i / LOSS_BINS for i in range(LOSS_BINS)] + [high]  # the highest counts
    elif losses:  # one value: one bin around it
        loss_edges = [losses[0] - 0.5, losses[0] + 0.5]
    progress_edges = [100 * i / PROGRESS_BINS for i in range(PROGRESS_BINS + 1)]
    states = sorted({v.state for v in views}, key=_state_rank)
    loss_counts, progress_counts = {}, {}
    for state in states:
        mine = [v for v in views if v.state == state]
        counted = histogram([v.loss for v in mine if v.loss is not None and math.isfinite(v.loss)], loss_edges)
        if any(counted):
            loss_counts[state] = counted
        counted = histogram([100 * v.fraction for v in mine if v.fraction is not None], progress_edges)
        if any(counted):
            progress_counts[state] = counted
    return {
        "loss": {"edges": loss_edges, "counts": loss_counts},
        "progress": {"edges": progress_edges, "counts": progress_counts},
    }


def histogram(values: Iterable[float], edges: Sequence[float]) -> list[int]:
    """How many `values` fall in each bin between consecutive `edges` (the last bin holds its upper edge too);
    a value outside them is not counted."""
    counts = [0] * max(len(edges) - 1, 0)
    for value in values:
        if counts and edges[0] <= value <= edges[-1]:
            counts[min(bisect.bisect_right(edges, value), len(counts)) - 1] += 1
    return counts


def live_report(run: RunRecord, name: str) -> dict[str, Any]:
    """What the experiment's report will say of it for the analysis, from its finished jobs so far: the rows of
    its training and of each cooldown that returned a result (analysis/runs.run_rows, as the report builds them)."""
    config = run.xcom(PREPARE_TASK, CONFIG_KEY) or {}
    cooldowns = run.xcom(PREPARE_TASK, COOLDOWNS_KEY) or []
    results = [run.result(TRAIN_TASK), *(run.result(COOLDOWN_TRAIN_TASK, i) for i in range(len(cooldowns)))]
    report: dict[str, Any] = {"experiment": name, "rows": []}
    if not config:
        return report
    try:
        scales = run_scales(config, cooldowns, results)
    except ConfigError:  # a config this version cannot read: the run has no measurements here
        return report
    runs = [name, *(c.get("name", "") for c in cooldowns)]
    for index, (run_name, result, scale) in enumerate(zip(runs, results, scales, strict=True)):
        report["rows"] += run_rows(run_name, result, [], {}, scale, cooldown=index > 0)
    report["settings"] = run_settings((config.get("backend") or {}).get("args") or {})
    return report


REPORTS_KEPT = 10_000  # runs' reports, ten sweeps of 1,000: a few kilobytes each


class LiveReports:
    """Each run's live report (`live_report`), kept while the XComs it is made from stay the same: a sweep page
    reads again only the runs whose config or results changed since (a job that finished), not a thousand
    configs and results at every load. `version`: what identifies those XComs (queries.report_versions)."""

    def __init__(self, kept: int = REPORTS_KEPT) -> None:
        self.kept = kept
        self._reports: dict[int, tuple[Any, dict[str, Any]]] = {}  # run pk -> (version, report), oldest use first
        self._lock = threading.Lock()

    def reports(
        self,
        versions: Mapping[int, Any],
        names: Mapping[int, str],
        load: Callable[[list[int]], Mapping[int, RunRecord]],
    ) -> list[dict[str, Any]]:
        """The report of each run of `versions` (run pk -> version), in its order, as experiment `names[pk]`;
        `load(pks)` reads the records (config, cooldowns, results) of those not kept at their version."""
        with self._lock:  # pages are built in worker threads: one reading of each run's records
            missing = [pk for pk, version in versions.items() if (self._reports.get(pk) or (None,))[0] != version]
            records = load(missing) if missing else {}
            made = {pk: live_report(records.get(pk) or RunRecord("", "", ""), names[pk]) for pk in missing}
            found = []
            for pk, version in versions.items():
                report = made[pk] if pk in made else self._reports.pop(pk)[1]
                self._reports[pk] = (version, report)  # last used last: the oldest go first
                found.append(report)
            while len(self._reports) > self.kept:
                self._reports.pop(next(iter(self._reports)))
            return found


# the last analyses, by their input: the page reloads every few seconds, the fit changes only with a new loss
_ANALYSES: dict[str, dict[str, Any]] = {}
_ANALYSES_LOCK = threading.Lock()
ANALYSES_KEPT = 16


def live_analysis(reports: Sequence[Mapping[str, Any]], experiments: Sequence[str]) -> dict[str, Any]:
    """The sweep analysis of the runs so far, with point estimates only (no bootstrap: the page must answer
    in a second; the sweep DAG's analysis task adds the intervals)."""
    from airflow_oellm.analysis.sweep import analyse_reports  # numpy and scipy: loaded on the first sweep page

    key = json.dumps([reports, experiments], sort_keys=True, default=str)
    with _ANALYSES_LOCK:  # pages are built in worker threads; one fit of each input
        if key not in _ANALYSES:
            if len(_ANALYSES) >= ANALYSES_KEPT:
                _ANALYSES.pop(next(iter(_ANALYSES)))
            _ANALYSES[key] = analyse_reports(reports, experiments, bootstrap=0)
        return _ANALYSES[key]
