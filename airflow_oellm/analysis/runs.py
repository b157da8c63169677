"""An experiment run's rows, as its report writes them and the dashboard analyses them live, without Airflow.

One row per run (the training, each cooldown) and checkpoint: the train loss near it, the validation loss,
evaluation metrics, GPU-hours and attempts, and what the sweep analysis fits: N, D, C and whether the loss
is comparable (analysis/measurements.py). They are built from what the job tasks return (their `result`:
the watch summary and the attempt history), so a finished cooldown has its rows before the report runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow_oellm.analysis.measurements import TrainingScale, comparable_source
from airflow_oellm.config.milestones import plan_runs
from airflow_oellm.monitor.accounting import used_gpu_hours
from airflow_oellm.monitor.records import AttemptHistory
from airflow_oellm.monitor.watch import loss_at, merged_curve, validation_losses


def run_rows(
    run: str,
    result: Mapping[str, Any] | None,
    evaluations: Sequence[Mapping[str, Any]],
    metrics: Mapping[tuple[int, str], Mapping[str, Any]],
    scale: TrainingScale | None = None,
    cooldown: bool = False,
) -> list[dict[str, Any]]:
    """A row per checkpoint of one run (the training or a cooldown): its losses and metrics, its GPU-hours and
    attempts and, given the run's `scale`, its parameters, tokens and FLOPs and whether its loss is comparable
    across the sweep's runs (analysis/sweep.comparable_source)."""
    summary = _unrewound_summary(result)
    history = AttemptHistory.of_result(result)
    attempts = history.attempts
    # every attempt's record, then the last attempt's whole summary: what the dashboard shows too
    validation = validation_losses([*history.rewound_validation(), summary.get("validation")])
    saved = {*(c for saves in history.rewound_saves() for c in saves), *(summary.get("checkpoints_saved") or [])}
    checkpoints = sorted({*saved, *(e["iteration"] for e in evaluations)})
    curve = run_curve(result)
    training_gpu_hours = used_gpu_hours(a.gpu_hours for a in attempts)  # this run's training, on each of its rows
    rows = []
    for iteration in checkpoints:
        row: dict[str, Any] = {
            "run": run,
            "iteration": iteration,
            "train_loss": loss_at(curve, iteration),
            "validation_loss": validation.get(iteration),
        }
        if scale is not None:
            row.update(scale.at(iteration, history.skipped_iterations()))
            row["comparable"] = comparable_source(scale.args, iteration, cooldown)
        for entry in evaluations:
            if entry["iteration"] != iteration:
                continue
            for suite in entry["suites"]:
                for metric, value in (metrics.get((iteration, suite)) or {}).get("metrics", {}).items():
                    row[f"{suite}.{metric}"] = value
        rows.append(row)
    for row in rows:
        row["gpu_hours"] = round(training_gpu_hours, 3)
        row["attempts"] = len(attempts)
    return rows


def run_curve(result: Mapping[str, Any] | None) -> list[tuple[float, float]]:
    """A training's loss over all its attempts (as the dashboard draws it), without what rewinds discarded."""
    kept, _ = AttemptHistory.of_result(result).rewound_curves()
    return merged_curve([*kept, _unrewound_summary(result).get("loss_curve")])


def _unrewound_summary(result: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The last job's summary, or nothing when that job was rewound (its record holds what is kept of it)."""
    attempts = AttemptHistory.of_result(result).attempts
    if attempts and attempts[-1].rewind:
        return {}
    return (result or {}).get("summary") or {}


def run_scales(
    config: Mapping[str, Any], cooldowns: Sequence[Mapping[str, Any]], results: Sequence[Any]
) -> list[TrainingScale | None]:
    """Each run's scale (N, and D and C by iteration): the training's, then each cooldown's, which counts
    its tokens on from its parent's at the checkpoint it starts from. None for all but Megatron."""
    if config.get("backend", {}).get("name") != "megatron":
        return [None] * len(results)
    planned = plan_runs(dict(config))
    training = TrainingScale.of(planned.config.backend.args, (results[0] or {}).get("summary"))
    skipped = AttemptHistory.of_result(results[0]).skipped_iterations()
    scales: list[TrainingScale | None] = [training]
    for cooldown, child, result in zip(cooldowns, planned.cooldowns, results[1:], strict=True):
        start = training.tokens(cooldown["at"], skipped)
        own = (result or {}).get("summary") or {}
        logged = own.get("parameters_by_rank") or own.get("parameters_billions")
        summary = own if logged else (results[0] or {}).get("summary")  # else its parent's count: the same model
        scales.append(TrainingScale.of(child.backend.args, summary, None if start is None else (cooldown["at"], start)))
    return scales
