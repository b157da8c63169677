"""One DAG run of an experiment, decided before anything is submitted: its config with the run's
overrides, its milestones and its planned GPU-hours, or a ConfigError saying why not.

`prepare` (operators/prepare.py) calls `plan_run` with what Airflow gave it; everything it refuses is
refused here: overrides that change nothing, branches the DAG was built without, a plan over budget.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from airflow_oellm.config.budget import (
    PlannedGpuHours,
    experiment_budget_issue,
    planned_gpu_hours,
    sweep_budget_issue,
)
from airflow_oellm.config.diff import run_changes
from airflow_oellm.config.errors import ConfigError, Issue
from airflow_oellm.config.loader import Experiment, Sweep, load_sweep, planned_hours
from airflow_oellm.config.milestones import Milestones, plan, with_cooldown_points
from airflow_oellm.config.noops import inert_overrides, unbuilt_branches

COOLDOWN_POINTS_PARAM = "cooldowns.at"  # a run's choice of cooldown points (a trigger-form field)


class OverBudget(ConfigError):
    """A run refused because its plan is over a GPU-hour budget: `prepare` tells the sweep's notifiers."""

    def __init__(self, issues: list[Issue], experiment: Experiment) -> None:
        super().__init__(issues)
        self.experiment = experiment


@dataclass(frozen=True)
class RunRequest:
    """What a run asks for, and what its DAG was built from."""

    sweep_file: str
    experiment_name: str
    when: datetime  # the run's frozen time
    overrides: Sequence[str] = ()  # the run's own
    sweep_overrides: Sequence[str] = ()  # the ones the DAG was built with
    config_dirs: Sequence[str] = ()
    cooldown_points: list[int] | None = None  # None: the sweep's
    scheduled_stamp: str | None = None  # a scheduled interval's logical date: its own directory
    checkpoint_branch: bool = True  # the DAG has the checkpoint (conversion) branch
    cooldown_branch: bool = True  # the DAG has the cooldown branch


@dataclass
class RunPlan:
    """What a run will do."""

    sweep: Sweep
    experiment: Experiment
    config: dict[str, Any]  # resolved with the run's overrides and frozen time
    when: datetime
    overrides: list[str]  # as recorded in the provenance
    milestones: Milestones
    planned: PlannedGpuHours
    differences: list[dict[str, Any]]  # how the experiment differs from its sweep's base (config/diff.py)
    changes: list[dict[str, Any]]  # the keys the run's overrides changed (config/diff.run_changes)


def plan_run(request: RunRequest) -> RunPlan:
    """The run's plan (raises ConfigError naming file, key and reason)."""
    extra: list[str] = []

    def resolve(run_overrides: Sequence[str]) -> tuple[Sweep, Experiment, dict[str, Any]]:
        sweep = load_sweep(
            request.sweep_file,
            [*request.sweep_overrides, *run_overrides, *extra],
            config_dirs=request.config_dirs,
            only=request.experiment_name,
            enforce_budget=False,  # judged once below, with the run's cooldown points
        )
        experiment = sweep.experiment(request.experiment_name)
        return sweep, experiment, experiment.runtime_config(request.when)

    if request.scheduled_stamp is not None:
        # each scheduled interval (and backfill) writes its own directory: runs never collide
        root = resolve([])[1].config.project.base_output_dir
        extra.append(f"project.base_output_dir={root}/runs/{request.scheduled_stamp}")

    @functools.cache
    def whole_sweep() -> Sweep:
        """Every experiment of the sweep, as its DAGs were built (loaded once, when needed)."""
        return load_sweep(
            request.sweep_file, request.sweep_overrides, config_dirs=request.config_dirs, enforce_budget=False
        )

    overrides = list(request.overrides)
    sweep, experiment, config = resolve(overrides)
    refused = inert_overrides(lambda rest: resolve(rest)[2], overrides, config)
    refused += unbuilt_branches(config, request.checkpoint_branch, request.cooldown_branch)
    if refused:
        raise ConfigError(refused)
    if request.cooldown_points is not None:
        config = with_cooldown_points(config, request.cooldown_points)
        overrides.append(f"{COOLDOWN_POINTS_PARAM}={json.dumps(request.cooldown_points)}")  # for the provenance record
    changes = run_changes(resolve([])[2], config) if overrides else []
    milestones = plan(config)
    planned = planned_gpu_hours(config)
    over = over_budget(experiment, planned, whole_sweep)
    if over:
        raise OverBudget(over, experiment)
    differences = whole_sweep().differences.get(experiment.name, [])
    return RunPlan(sweep, experiment, config, request.when, overrides, milestones, planned, differences, changes)


def over_budget(experiment: Experiment, planned: PlannedGpuHours, whole_sweep: Callable[[], Sweep]) -> list[Issue]:
    """This run against its own limit, and with every other experiment's plan against the sweep's."""
    project = experiment.config.project
    issues = [experiment_budget_issue(experiment.config, planned, experiment.name)]
    if project.gpu_hour_budget is not None:
        others = [e for e in whole_sweep().experiments if e.name != experiment.name]
        issues.append(
            sweep_budget_issue(
                project.gpu_hour_budget,
                {**planned_hours(others), experiment.name: planned},
                extra=f" with this run's overrides (this run: {planned.total:,.1f})",
            )
        )
    return [experiment.origins.issue(i.message, i.key) for i in issues if i is not None]
