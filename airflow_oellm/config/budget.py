"""Planned GPU-hours of an experiment run and the budget guard.

Planned hours are what a run may hold at most: every job at its time limit, every allowed attempt.
The training's `restart.max_attempts` submissions, each cooldown's own, and every conversion and
evaluation job (two attempts each) of the run's milestones. A sweep's planned hours are the sum of
one run of each experiment. `project.gpu_hour_budget` caps that sum, and
`project.gpu_hour_budget_per_experiment` caps each run: over either, the sweep is refused when it is
loaded (validate, the DAG factory) and a run whose overrides push it over is refused by `prepare`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from airflow_oellm.config.errors import Issue
from airflow_oellm.config.milestones import CONVERT, EVALUATE, job_config, plan, typed
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.slurm.timespec import time_limit_seconds

SWEEP_BUDGET_KEY = "project.gpu_hour_budget"
PLANNED_RECORD = "planned_gpu_hours"  # the name a run's record (prepare's XCom) carries the figures under
EXPERIMENT_BUDGET_KEY = "project.gpu_hour_budget_per_experiment"


def attempt_gpu_hours(cfg: RootConfig) -> float:
    """GPU-hours of one submission at its time limit (infinite without a limit)."""
    seconds = time_limit_seconds(cfg.slurm.time)
    gpus = cfg.slurm.nodes * cfg.slurm.gpus_per_node
    if not gpus:
        return 0.0
    return float("inf") if seconds is None else gpus * seconds / 3600.0


def _job_hours(config: dict[str, Any]) -> float:
    cfg = typed(config)
    return attempt_gpu_hours(cfg) * cfg.restart.max_attempts


@dataclass(frozen=True)
class PlannedGpuHours:
    """One experiment run's planned GPU-hours, by kind of job."""

    training: float
    cooldowns: float
    side_jobs: float

    @property
    def total(self) -> float:
        return self.training + self.cooldowns + self.side_jobs

    def as_record(self) -> dict[str, float]:
        """JSON-safe (it travels as XCom), rounded for people."""
        return {k: round(v, 3) for k, v in {**asdict(self), "total": self.total}.items()}


def planned_gpu_hours(config: dict[str, Any]) -> PlannedGpuHours:
    """Planned GPU-hours of a run of this resolved (run-time) experiment config."""
    milestones = plan(config)
    cooldowns = sum(
        _job_hours(job_config(config, {"kind": "cooldown", "cooldown": c["index"]})) for c in milestones.cooldowns
    )
    side_jobs = 0.0
    runs = [(None, milestones.evaluations)] + [
        (c["index"], [{"iteration": c["final_iteration"], "suites": c["suites"]}] if c["suites"] else [])
        for c in milestones.cooldowns
    ]
    for cooldown, evaluations in runs:
        for entry in evaluations:
            job = {"iteration": entry["iteration"], "cooldown": cooldown}
            side_jobs += _job_hours(job_config(config, {**job, "kind": CONVERT}))
            if entry["suites"]:
                side_jobs += _job_hours(job_config(config, {**job, "kind": EVALUATE, "suites": entry["suites"]}))
    return PlannedGpuHours(_job_hours(config), cooldowns, side_jobs)


def _figures(planned: PlannedGpuHours) -> str:
    return (
        f"{planned.total:,.1f} planned: training {planned.training:,.1f}, cooldowns {planned.cooldowns:,.1f}, "
        f"conversions and evaluations {planned.side_jobs:,.1f}, every job at its time limit and every attempt"
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
    shown = ", ".join(f"{name} {p.total:,.1f}" for name, p in largest)
    return Issue(
        f"the sweep plans {total:,.1f} GPU-hours{extra} for {len(planned)} experiment(s), over its budget of "
        f"{budget:,.1f} (largest: {shown}; every job at its time limit and every attempt; `airflow-oellm plan` "
        "lists them all)",
        key=SWEEP_BUDGET_KEY,
    )
