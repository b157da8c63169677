"""Planned GPU-hours of an experiment run and the budget guard.

Planned hours are what a run may hold at most: every job at its time limit, every allowed attempt.
The training's `restart.max_attempts` submissions, as many for each cooldown (with its own resources),
and every conversion and evaluation job of the run (two attempts each). A sweep's planned hours are the sum of
one run of each experiment. `project.gpu_hour_budget` caps that sum, and
`project.gpu_hour_budget_per_experiment` caps each run: over either, the sweep is refused when it is
loaded (validate, the DAG factory) and a run whose overrides push it over is refused by `prepare`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from airflow_oellm.config.errors import ConfigError, Issue
from airflow_oellm.config.milestones import SIDE_JOB_ATTEMPTS, plan_runs
from airflow_oellm.config.schema import JobResources, RootConfig, SlurmConfig
from airflow_oellm.slurm.timespec import time_limit_seconds

SWEEP_BUDGET_KEY = "project.gpu_hour_budget"
PLANNED_RECORD = "planned_gpu_hours"  # the name a run's record (prepare's XCom) carries the figures under
EXPERIMENT_BUDGET_KEY = "project.gpu_hour_budget_per_experiment"


def limit_gpu_hours(resources: SlurmConfig | JobResources, key: str = "slurm.time") -> float:
    """GPU-hours one submission may use: its GPUs for its whole time limit (infinite without a limit);
    `key` names its time. What attempts really used is monitor/accounting.py's."""
    gpus = resources.nodes * resources.gpus_per_node
    if not gpus:
        return 0.0
    try:
        seconds = time_limit_seconds(resources.time)
    except ValueError as exc:
        raise ConfigError(Issue(str(exc), key=key)) from None
    return float("inf") if seconds is None else gpus * seconds / 3600.0


@dataclass(frozen=True)
class PlannedGpuHours:
    """One experiment run's planned GPU-hours, by kind of job."""

    training: float
    cooldowns: float
    side_jobs: float

    @property
    def total(self) -> float:
        return self.training + self.cooldowns + self.side_jobs

    def as_record(self) -> dict[str, float | None]:
        """JSON-safe (it travels as XCom), rounded for people; an unlimited figure is None."""
        figures = {**asdict(self), "total": self.total}
        return {k: None if math.isinf(v) else round(v, 3) for k, v in figures.items()}


def planned_gpu_hours(config: dict[str, Any]) -> PlannedGpuHours:
    """Planned GPU-hours of a run of this resolved (run-time) experiment config.

    Every job as the DAG runs it: the training and each cooldown with the training's attempts (Airflow's
    retries are set when the DAG is built), a conversion per converted checkpoint and per training
    cooldown, an evaluation where suites are due, `SIDE_JOB_ATTEMPTS` each.
    """
    runs = plan_runs(config)
    cfg, milestones = runs.config, runs.milestones
    attempts = cfg.restart.max_attempts
    training = limit_gpu_hours(cfg.slurm) * attempts
    convert = limit_gpu_hours(cfg.conversion.resources, "conversion.resources.time")
    evaluate = limit_gpu_hours(cfg.evaluation.resources, "evaluation.resources.time")
    evaluated = sum(1 for e in milestones.evaluations if e["suites"])
    side_jobs = len(milestones.evaluations) * convert + evaluated * evaluate
    cooldowns = 0.0
    for c, child in zip(milestones.cooldowns, runs.cooldowns, strict=True):
        where = f"cooldowns[at={c['at']}].overrides: "
        cooldowns += limit_gpu_hours(child.slurm, where + "slurm.time") * attempts
        if child.conversion.enabled:  # the DAG converts every training cooldown's final checkpoint
            side_jobs += limit_gpu_hours(child.conversion.resources, where + "conversion.resources.time")
            if c["suites"]:
                side_jobs += limit_gpu_hours(child.evaluation.resources, where + "evaluation.resources.time")
    return PlannedGpuHours(training, cooldowns, side_jobs * SIDE_JOB_ATTEMPTS)


def _hours(value: float) -> str:
    return "unlimited" if math.isinf(value) else f"{value:,.1f}"


def _figures(planned: PlannedGpuHours) -> str:
    return (
        f"{_hours(planned.total)} planned: training {_hours(planned.training)}, cooldowns {_hours(planned.cooldowns)}, "
        f"conversions and evaluations {_hours(planned.side_jobs)}, every job at its time limit and every attempt"
    )


def experiment_budget_issue(cfg: RootConfig, planned: PlannedGpuHours, name: str) -> Issue | None:
    limit = cfg.project.gpu_hour_budget_per_experiment
    if limit is None or planned.total <= limit:
        return None
    return Issue(
        f"experiment {name} is over its GPU-hour budget: {_figures(planned)}, limit {limit:,.1f} "
        "(lower slurm.time, slurm.nodes or restart.max_attempts, evaluate fewer checkpoints, or raise the limit)",
        key=EXPERIMENT_BUDGET_KEY,
    )


def sweep_budget_issue(budget: float | None, planned: Mapping[str, PlannedGpuHours], extra: str = "") -> Issue | None:
    """`planned`: experiment name -> its planned hours; `extra` says what the figures include."""
    total = sum(p.total for p in planned.values())
    if budget is None or total <= budget:
        return None
    largest = sorted(planned.items(), key=lambda kv: kv[1].total, reverse=True)[:3]
    shown = ", ".join(f"{name} {_hours(p.total)}" for name, p in largest)
    return Issue(
        f"the sweep plans {_hours(total)} GPU-hours{extra} for {len(planned)} experiment(s), over its budget of "
        f"{budget:,.1f} (largest: {shown}; every job at its time limit and every attempt; `airflow-oellm plan` "
        "lists them all)",
        key=SWEEP_BUDGET_KEY,
    )
