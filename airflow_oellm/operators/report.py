"""ExperimentReportOperator: one table of an experiment run, its cooldowns and their checkpoints.

Rows: (run, checkpoint) with train loss near that iteration, validation loss, every evaluation
metric, GPU-hours and attempts. Written next to the experiment's output (report.md, report.csv,
report.json, loss.png) and returned as XCom. Evaluation results are read from the cluster in one
command.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from airflow_oellm.analysis.measurements import TrainingScale, run_settings
from airflow_oellm.analysis.runs import run_curve, run_rows, run_scales
from airflow_oellm.config.budget import PLANNED_RECORD
from airflow_oellm.config.milestones import eval_file, retention_branches, typed
from airflow_oellm.config.naming import (
    CHECKPOINT_GROUP,
    CONFIG_KEY,
    CONVERT_TASK,
    COOLDOWN_GROUP,
    COOLDOWN_TRAIN_TASK,
    COOLDOWNS_KEY,
    EVALUATE_TASK,
    PREPARE_TASK,
    REPORT_DIR,
    REPORT_TASK,
    RESULT_KEY,
    RUN_TASK,
    TRAIN_TASK,
    in_group,
)
from airflow_oellm.hooks.alerting import dashboard_link, send_alert
from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.monitor.accounting import used_gpu_hours_by_kind
from airflow_oellm.monitor.classify import STOPPED
from airflow_oellm.monitor.retention import RetentionSettings, deletions, retention_notice
from airflow_oellm.notifications import Alert
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget


def gpu_hours_line(planned: Mapping[str, Any] | None, used: Mapping[str, float]) -> str:
    """`GPU-hours used: 12.3 of 39.0 planned (training 8.0 of 24.0, ...)`; an unlimited plan is None."""
    names = {"training": "training", "cooldowns": "cooldowns", "side_jobs": "conversions and evaluations"}
    if not planned:
        return f"GPU-hours used: {used['total']:.3g}"

    def figure(value: float | None) -> str:
        return "unlimited" if value is None else f"{value:.3g}"

    parts = ", ".join(f"{name} {used.get(kind, 0):.3g} of {figure(planned.get(kind))}" for kind, name in names.items())
    return f"GPU-hours used: {used['total']:.3g} of {figure(planned.get('total'))} planned ({parts})"


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(
    curves: Mapping[str, Sequence[Sequence[float]]], evals: Mapping[str, list[tuple[int, float]]], title: str
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
    for run, curve in curves.items():
        if curve:
            left.plot([p[0] for p in curve], [p[1] for p in curve], label=run)
    left.set_xlabel("iteration")
    left.set_ylabel("train loss")
    left.set_title(title)
    for label, points in evals.items():
        if points:
            right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    right.set_xlabel("iteration")
    right.set_ylabel("evaluation")
    for axis in (left, right):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    pyplot.close(figure)
    return buffer.getvalue()


class ExperimentReportOperator(BaseOperator):
    """Collect the run's results (train and cooldown XComs, evaluation files) into a table and a plot."""

    ui_color = "#fdf6e3"

    def __init__(
        self,
        *,
        prepare_task_id: str = PREPARE_TASK,
        train_task_id: str = TRAIN_TASK,
        cooldown_task_id: str | None = COOLDOWN_TRAIN_TASK,
        side_job_task_ids: Sequence[str] = (CONVERT_TASK, EVALUATE_TASK),
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        sweep: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", "all_done")  # report what there is, also after a failure
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        self.sweep = sweep  # the sweep the experiment belongs to: `analyze` groups reports by it
        self.prepare_task_id = prepare_task_id
        self.train_task_id = train_task_id
        self.cooldown_task_id = cooldown_task_id
        self.side_job_task_ids = list(side_job_task_ids)  # in the checkpoint and cooldown task groups
        self.cluster = cluster

    @staticmethod
    def _result(ti: Any, task_id: str, map_index: int | None = None) -> Any:
        """A training task's result: its return value, or the `result` it leaves when it fails."""
        kwargs = {} if map_index is None else {"map_indexes": map_index}
        return ti.xcom_pull(task_ids=task_id, **kwargs) or ti.xcom_pull(task_ids=task_id, key=RESULT_KEY, **kwargs)

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        config = ti.xcom_pull(task_ids=self.prepare_task_id, key=CONFIG_KEY)
        if not config:
            raise AirflowSkipException(f"nothing to report: {self.prepare_task_id} did not prepare this run")
        exp = config["experiment"]
        cooldowns = ti.xcom_pull(task_ids=self.prepare_task_id, key=COOLDOWNS_KEY) or []
        evaluations = ti.xcom_pull(task_ids=self.prepare_task_id) or []
        runs = [(exp["name"], exp["output_dir"], self._result(ti, self.train_task_id), evaluations)]
        for i, cooldown in enumerate(cooldowns):
            evals = (
                [{"iteration": cooldown["final_iteration"], "suites": cooldown["suites"]}] if cooldown["suites"] else []
            )
            result = self._result(ti, self.cooldown_task_id, i) if self.cooldown_task_id else None
            runs.append((cooldown["name"], cooldown["output_dir"], result, evals))
        wanted = [
            (name, out, e["iteration"], suite) for name, out, _, evs in runs for e in evs for suite in e["suites"]
        ]
        metrics = self._read_metrics(wanted)
        scales = run_scales(config, cooldowns, [result for _, _, result, _ in runs])
        rows = []
        for index, (name, _out, result, evals) in enumerate(runs):
            rows += run_rows(name, result, evals, metrics.get(name, {}), scales[index], cooldown=index > 0)
        columns = ["run", "iteration", "train_loss", "validation_loss"]
        last = ["parameters", "tokens", "flops", "comparable", "gpu_hours", "attempts"]
        metric_columns = sorted({k for r in rows for k in r} - {*columns, *last})
        columns += [*metric_columns, *[c for c in last if any(c in r for r in rows)]]
        curves = {name: run_curve(result) for name, _, result, _ in runs}
        first_metric = next((c for c in columns if "." in c), None)
        evals_plot = {}
        if first_metric:
            for name, *_ in runs:
                points = [(r["iteration"], r[first_metric]) for r in rows if r["run"] == name and r.get(first_metric)]
                evals_plot[f"{name} {first_metric}"] = points
        used = used_gpu_hours_by_kind(
            {
                "training": [runs[0][2]],
                "cooldowns": [result for _, _, result, _ in runs[1:]],
                "side_jobs": self._side_job_results(ti, len(evaluations), cooldowns),
            }
        )
        planned = ti.xcom_pull(task_ids=self.prepare_task_id, key=PLANNED_RECORD)
        args = config.get("backend", {}).get("args") or {}
        judged = (runs[0][2] or {}).get("classification") or {}
        report = {
            "experiment": exp["name"],
            "sweep": self.sweep,
            "settings": run_settings(args),
            "parameters": self._parameters_note(scales[0]),
            "columns": columns,
            "rows": rows,
            "gpu_hours": {"planned": planned, "used": used},
            "output": f"{exp['output_dir']}/{REPORT_DIR}",
            # the sweep's early stopping stopped the training (not a failure): why
            "stopped_early": judged.get("reason") if judged.get("verdict") == STOPPED else None,
        }
        text = markdown(rows, columns) + "\n" + gpu_hours_line(planned, used) + "\n"
        if report["stopped_early"]:
            text += f"Training {report['stopped_early']}\n"
        self._write(exp["output_dir"], text, rows, columns, plot(curves, evals_plot, exp["name"]), report)
        self.log.info("report of %s:\n%s", exp["name"], text)
        self._retain(config, cooldowns)
        return report

    def _parameters_note(self, scale: TrainingScale | None) -> dict[str, Any] | None:
        """The training's N, where it comes from, and the arguments' count it was checked against."""
        if scale is None:
            return None
        if scale.mismatch:
            self.log.warning("the model's parameters: %s", scale.mismatch)
        return {
            "count": scale.parameters,
            "from": scale.parameters_from,
            "arguments": scale.parameters_computed,
            "mismatch": scale.mismatch,
        }

    def _retain(self, config: dict[str, Any], cooldowns: Sequence[Mapping[str, Any]]) -> None:
        """The run's last checkpoint retention pass: the watch deletes after each save, but branches that
        completed after the training ended (a cooldown, the last conversions) free their checkpoints only now."""
        cfg = typed(config)
        settings = RetentionSettings.from_config(cfg.retention)
        if settings is None or cfg.backend.name != "megatron":
            return
        directories = {str(cfg.backend.args.get("save") or cfg.experiment.checkpoint_dir): retention_branches(config)}
        directories.update({c["checkpoint_dir"]: {} for c in cooldowns})
        hook = SlurmHook(cluster=self.cluster)
        try:
            probes = hook.poll_cycle([], CycleRequest(checkpoints=list(directories))).checkpoints
            for (directory, branches), probe in zip(directories.items(), probes, strict=True):
                gone = deletions(probe.complete, settings, tracker=probe.latest, branches=branches)
                if gone:
                    deleted, kept = hook.delete_checkpoints(directory, [(d.iteration, d.branches) for d in gone])
                    self.log.info(retention_notice(directory, deleted, kept))
        except Exception as exc:  # the report stands; the checkpoints stay until a later run's pass
            self.log.warning("the run's last checkpoint retention pass failed: %s", exc)
        finally:
            hook.close()

    def _side_job_results(self, ti: Any, checkpoints: int, cooldowns: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Results of every conversion and evaluation task of the run (mapped: one per branch)."""
        branches = [(CHECKPOINT_GROUP, i) for i in range(checkpoints)]
        branches += [(COOLDOWN_GROUP, i) for i in range(len(cooldowns))]
        return [self._result(ti, in_group(group, task), i) for group, i in branches for task in self.side_job_task_ids]

    def _read_metrics(self, wanted: list[tuple[str, str, int, str]]) -> dict[str, dict[tuple[int, str], Any]]:
        if not wanted:
            return {}
        hook = SlurmHook(cluster=self.cluster)
        try:
            chunks = hook.read_ranges([(eval_file(out, it, suite), 0, 1 << 20) for _, out, it, suite in wanted])
        finally:
            hook.close()
        found: dict[str, dict[tuple[int, str], Any]] = {}
        for (name, _, iteration, suite), chunk in zip(wanted, chunks, strict=True):
            if chunk.size is None:
                continue
            try:
                found.setdefault(name, {})[(iteration, suite)] = json.loads(chunk.data.decode())
            except ValueError:
                self.log.warning("unreadable evaluation result %s", chunk.path)
        return found

    def _write(
        self,
        output_dir: str,
        text: str,
        rows: list[dict[str, Any]],
        columns: list[str],
        png: bytes,
        report: dict[str, Any],
    ) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        directory = f"{output_dir}/{REPORT_DIR}"
        files = [
            (f"{directory}/report.md", text.encode()),
            (f"{directory}/report.csv", buffer.getvalue().encode()),
            (f"{directory}/report.json", json.dumps(report, indent=2).encode()),
            (f"{directory}/loss.png", png),
        ]
        if not write_files(self.cluster, files):
            self.log.warning("could not write every report file to %s", directory)


def write_files(cluster: ClusterTarget, files: Sequence[tuple[str, bytes]]) -> bool:
    """Write result files (a report, an analysis) where the jobs run; whether every one landed."""
    hook = SlurmHook(cluster=cluster)
    try:
        return all(hook.write_files(files))
    finally:
        hook.close()


def summary_row(experiment: str, state: str | None, report: Mapping[str, Any] | None) -> dict[str, Any]:
    """One experiment's line of a sweep summary: its run's state and its training's last checkpoint."""
    rows = [r for r in (report or {}).get("rows", []) if r.get("run") == experiment]
    last = max(rows, key=lambda r: r["iteration"]) if rows else {}
    row = {"experiment": experiment, "state": state, **{k: v for k, v in last.items() if k != "run"}}
    if (report or {}).get("stopped_early"):  # its run succeeds (a stop is no failure): the row says what it was
        row.update(state="stopped early", stopped_early=report["stopped_early"])
    return row


class SweepReportsOperator(BaseOperator):
    """A sweep DAG task over its experiments' reports: of the runs its trigger tasks started."""

    ui_color = "#fdf6e3"

    def __init__(
        self,
        *,
        experiments: Mapping[str, str],
        trigger_task_id: str | Sequence[str] = RUN_TASK,
        part_size: int | None = None,
        report_task_id: str = REPORT_TASK,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.experiments = dict(experiments)  # DAG id -> experiment name, in the trigger tasks' map order
        # several trigger tasks when the sweep is larger than one mapped task may be: `part_size` each
        self.trigger_task_ids = [trigger_task_id] if isinstance(trigger_task_id, str) else list(trigger_task_id)
        self.part_size = part_size or max(len(self.experiments), 1)
        self.report_task_id = report_task_id

    def reports(self, ti: Any) -> list[tuple[str, str, Mapping[str, Any] | None]]:
        """Each experiment's name, its run's state ("not started" without one) and its report, if any."""
        found = []
        run_ids = experiment_run_ids(ti, list(self.experiments), self.trigger_task_ids, self.part_size)
        for dag_id, name in self.experiments.items():
            run_id = run_ids[dag_id]
            if not run_id:
                found.append((name, "not started", None))
                continue
            report = ti.xcom_pull(dag_id=dag_id, task_ids=self.report_task_id, run_id=run_id)
            state = ti.get_dagrun_state(dag_id, run_id)
            found.append((name, str(getattr(state, "value", state)), report))
        return found


def experiment_run_ids(
    ti: Any, dag_ids: Sequence[str], trigger_task_ids: Sequence[str], part_size: int
) -> dict[str, str | None]:
    """The run of each experiment DAG the sweep DAG's trigger tasks started (None: not yet), in map order."""
    found = {}
    for index, dag_id in enumerate(dag_ids):
        task_id, map_index = trigger_task_ids[index // part_size], index % part_size
        found[dag_id] = ti.xcom_pull(task_ids=task_id, map_indexes=map_index, key="trigger_run_id") or None
    return found


class SweepSummaryOperator(SweepReportsOperator):
    """The sweep DAG's summary: one row per experiment (state, last checkpoint's losses and metrics,
    GPU-hours, attempts), from the runs its trigger task started; logged as Markdown and returned, and told
    to the sweep's notifiers (`sweep_finished`).

    :param sweep: the sweep's name (for the alert).
    :param notifications: the sweep's `NotificationsConfig` as a dict (None: nobody to tell).
    """

    def __init__(self, *, sweep: str = "", notifications: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweep = sweep
        self.notifications = dict(notifications) if notifications else None

    def execute(self, context: Any) -> dict[str, Any]:
        rows = [summary_row(name, state, report) for name, state, report in self.reports(context["ti"])]
        columns = ["experiment", "state", "iteration", "train_loss", "validation_loss"]
        columns += sorted({k for r in rows for k in r} - {*columns, "gpu_hours", "attempts"})
        columns += ["gpu_hours", "attempts"]
        table = markdown(rows, columns)
        self.log.info("sweep summary:\n%s", table)
        if self.notifications:
            states = ", ".join(f"{state} {n}" for state, n in sorted(Counter(str(r["state"]) for r in rows).items()))
            link = dashboard_link(self.notifications, sweep=self.sweep)
            send_alert(self.notifications, Alert("sweep_finished", self.sweep, None, states, link, table), self.log)
        return {"columns": columns, "rows": rows}


class RunOutcomeOperator(BaseOperator):
    """Fails the run when any task failed. The report runs after failures too, and a run's state
    follows its leaf tasks: without this, a failed training under a green report would look green."""

    ui_color = "#f4f4f4"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "one_failed")
        super().__init__(**kwargs)

    def execute(self, context: Any) -> None:
        raise AirflowFailException("a task of this run failed (see its log; the report has the results)")
