"""PrepareExperimentOperator: the first task of an experiment's DAG run.

XCom: return value = the checkpoints to convert and evaluate; keys `config` (the resolved config),
`cooldowns`, `checkpoints`, `overrides`, `run_time`, `planned_gpu_hours`.


Merges the run's overrides (trigger form fields and the free `overrides` list) into the sweep,
validates them before anything is submitted, resolves the experiment's config once with the run's
frozen time (so every retry sees the same timestamps), writes provenance next to the experiment's
output on the cluster, and plans the run's milestones: which checkpoints get converted and
evaluated, where cooldowns branch off, and what that may cost in GPU-hours (refused over the
sweep's budget). Its XCom feeds every other task of the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException

import airflow_oellm
from airflow_oellm.config import ConfigError
from airflow_oellm.config.budget import PLANNED_RECORD
from airflow_oellm.config.errors import shown
from airflow_oellm.config.naming import (
    CHECKPOINTS_KEY,
    CONFIG_DIFF_KEY,
    CONFIG_KEY,
    COOLDOWNS_KEY,
    OVERRIDES_KEY,
    RUN_TIME_KEY,
    TRACKING_KEY,
)
from airflow_oellm.config.overrides import lookup, parse_overrides
from airflow_oellm.config.run import COOLDOWN_POINTS_PARAM, OverBudget, RunPlan, RunRequest, plan_run
from airflow_oellm.config.tracking import run_tracking
from airflow_oellm.hooks.alerting import dashboard_link, send_alert
from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.jobscript.render import RenderError, render_run_scripts
from airflow_oellm.notifications import Alert
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget

OVERRIDES_PARAM = "overrides"
# what identifies the experiment: a run may not move it
PROTECTED = ("project.name", "project.base_output_dir", "sweep", "experiment")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def run_params(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Param]:
    """Typed trigger-form fields for config keys (their current values as defaults) and `overrides`."""
    params: dict[str, Param] = {}
    for key in keys:
        value = lookup(config, key)
        if isinstance(value, bool | int | float | str):
            kind = [_JSON_TYPES[type(value)], "null"]
            if isinstance(value, int) and not isinstance(value, bool) and key.endswith("time"):
                kind = ["integer", "string", "null"]  # a time limit: seconds or a SLURM string
            params[key] = Param(value, type=kind, description=f"Config key {key}")
    if config.get("cooldowns"):
        params[COOLDOWN_POINTS_PARAM] = Param(
            [c["at"] for c in config["cooldowns"]],
            type="array",
            items={"type": "integer", "minimum": 1},
            description="Checkpoint iterations the cooldowns start from: drop one, or add one "
            "(a new point copies the settings of the first training cooldown)",
        )
    params[OVERRIDES_PARAM] = Param(
        [],
        type="array",
        items={"type": "string"},
        description="More config overrides, like on the command line: key=value, +key=value, ~key, group=option",
    )
    return params


def override_strings(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """Overrides for the trigger-form fields that differ from their defaults, then the free list."""
    out = []
    for key, value in values.items():
        if key == OVERRIDES_PARAM or key not in defaults:
            continue
        if value != defaults[key]:
            out.append(f"{key}={json.dumps(value)}")
    free = values.get(OVERRIDES_PARAM) or []
    if not isinstance(free, list) or not all(isinstance(o, str) for o in free):
        raise AirflowFailException(f"'{OVERRIDES_PARAM}' must be a list of strings like key=value, got {shown(free)}")
    return out + list(free)


def check_protected(overrides: Sequence[str]) -> None:
    for o in parse_overrides(overrides):
        if any(o.key == p or o.key.startswith(p + ".") for p in PROTECTED):
            raise AirflowFailException(
                f"override {shown(o.text)} would change {o.key}, which identifies the experiment "
                "(its name and output directory); make a new sweep point instead"
            )


def one_line(problem: object) -> str:
    """A task failure's reason on one line (Airflow shows the first line of an exception)."""
    return "; ".join(line.strip() for line in str(problem).splitlines() if line.strip())


def safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


class PrepareExperimentOperator(BaseOperator):
    """Resolve, validate and plan one experiment run; returns the checkpoints to convert and evaluate."""

    ui_color = "#f3eefa"

    def __init__(
        self,
        *,
        sweep_file: str,
        experiment_name: str,
        sweep_overrides: Sequence[str] = (),
        config_dirs: Sequence[str] = (),
        param_defaults: Mapping[str, Any] | None = None,
        scheduled: bool = False,
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        checkpoint_branch: bool = True,
        **kwargs: Any,
    ) -> None:
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        self.checkpoint_branch = checkpoint_branch  # the DAG converts and evaluates checkpoints
        self.sweep_file = sweep_file
        self.sweep_overrides = list(sweep_overrides)  # the ones the DAG was built with
        self.experiment_name = experiment_name
        self.config_dirs = list(config_dirs)
        self.param_defaults = dict(param_defaults or {})
        self.scheduled = scheduled
        self.cluster = cluster

    def execute(self, context: Any) -> list[dict[str, Any]]:
        dag_run = context["dag_run"]
        run = self._apply_conf(dag_run, dict(context["params"]))
        config, milestones = run.config, run.milestones
        self.log.info(
            "experiment %s, run time %s, overrides %s", self.experiment_name, run.when.isoformat(), run.overrides
        )
        self.log.info(
            "checkpoints %s; %d converted + evaluated; %d cooldown(s)",
            milestones.checkpoints,
            len(milestones.evaluations),
            len(milestones.cooldowns),
        )
        self._write_provenance(config, run.experiment.unresolved, run.overrides, dag_run.run_id, run.when)
        ti = context["ti"]
        for key, value in (
            (CONFIG_KEY, config),
            (OVERRIDES_KEY, run.overrides),
            (RUN_TIME_KEY, run.when.isoformat()),
            (CHECKPOINTS_KEY, milestones.checkpoints),
            (COOLDOWNS_KEY, milestones.cooldowns),
            (PLANNED_RECORD, run.planned.as_record()),
            (CONFIG_DIFF_KEY, {"sweep": run.differences, "run": run.changes}),
            (TRACKING_KEY, run_tracking(config, milestones.cooldowns)),
        ):
            ti.xcom_push(key=key, value=value)
        # the return value is what the checkpoint branches map over (Airflow maps over return values only)
        return milestones.evaluations

    def _apply_conf(self, dag_run: Any, params: Mapping[str, Any]) -> RunPlan:
        """The run's config and plan, or a failure that is not retried: the same conf fails the same way."""
        try:
            return self._run_plan(dag_run, params)
        except AirflowException:
            raise
        except Exception as exc:
            self.log.exception("applying the run's conf failed unexpectedly")
            raise AirflowFailException(
                f"could not apply this run's conf: {type(exc).__name__}: {one_line(exc)} "
                "(a bug in airflow-oellm, not in the conf; the traceback is in this task's log)"
            ) from None

    def _run_plan(self, dag_run: Any, params: Mapping[str, Any]) -> RunPlan:
        conf = dict(dag_run.conf or {})
        unknown = [k for k in conf if k not in self.param_defaults and k != OVERRIDES_PARAM]
        if unknown:
            raise AirflowFailException(
                f"unknown key(s) in the run's conf: {', '.join(map(repr, unknown))}; this DAG takes "
                f"{', '.join(sorted(self.param_defaults))} and '{OVERRIDES_PARAM}' (a list of key=value)"
            )
        values = {**self.param_defaults, **params, **conf}
        points = values.pop(COOLDOWN_POINTS_PARAM, None)
        overrides = override_strings(values, {k: v for k, v in self.param_defaults.items() if k in values})
        try:
            check_protected(overrides)
        except ConfigError as exc:  # an override that does not even parse
            raise AirflowFailException(f"invalid overrides for this run: {one_line(exc)}") from None
        scheduled = self.scheduled and dag_run.logical_date is not None
        request = RunRequest(
            sweep_file=self.sweep_file,
            experiment_name=self.experiment_name,
            when=dag_run.run_after,
            overrides=overrides,
            sweep_overrides=self.sweep_overrides,
            config_dirs=self.config_dirs,
            cooldown_points=points if points != self.param_defaults.get(COOLDOWN_POINTS_PARAM) else None,
            scheduled_stamp=dag_run.logical_date.strftime("%Y%m%dT%H%M%S") if scheduled else None,
            checkpoint_branch=self.checkpoint_branch,
            cooldown_branch=COOLDOWN_POINTS_PARAM in self.param_defaults,
        )
        try:
            run = plan_run(request)
            render_run_scripts(run.config, run.milestones, run.sweep.template_dirs)
        except OverBudget as exc:
            cfg = exc.experiment.config
            link = dashboard_link(asdict(cfg.notifications), dag_id=dag_run.dag_id, run_id=dag_run.run_id)
            alert = Alert("budget_reached", cfg.experiment.sweep, exc.experiment.name, one_line(exc), link)
            send_alert(asdict(cfg.notifications), alert, self.log)
            raise AirflowFailException(f"invalid overrides or config for this run: {one_line(exc)}") from None
        except (ConfigError, RenderError) as exc:
            raise AirflowFailException(f"invalid overrides or config for this run: {one_line(exc)}") from None
        return run

    def _write_provenance(
        self, config: dict[str, Any], unresolved: dict[str, Any], overrides: list[str], run_id: str, when: datetime
    ) -> None:
        directory = config["experiment"]["provenance_dir"]
        meta = {
            "run_id": run_id,
            "run_time": when.isoformat(),
            "overrides": overrides,
            "package_version": airflow_oellm.__version__,
            "sweep_file": self.sweep_file,
            "experiment": self.experiment_name,
        }
        files = [
            (f"{directory}/resolved.json", config),
            (f"{directory}/unresolved.json", unresolved),  # escapes intact: a cooldown resolves its own times
            (f"{directory}/run.json", meta),
            (f"{directory}/runs/{safe_run_id(run_id)}.json", meta),
        ]
        hook = SlurmHook(cluster=self.cluster)
        try:
            written = hook.write_files([(p, json.dumps(v, indent=2).encode()) for p, v in files])
        finally:
            hook.close()
        if not all(written):
            raise AirflowException(f"could not write provenance to {directory}")


class CooldownPlanOperator(BaseOperator):
    """Returns the run's cooldowns (`prepare`'s `cooldowns` XCom): Airflow maps over return values only."""

    template_fields: Sequence[str] = ("cooldowns",)
    ui_color = "#f4f4f4"

    def __init__(self, *, cooldowns: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cooldowns = cooldowns

    def execute(self, context: Any) -> list[dict[str, Any]]:
        return list(self.cooldowns or [])
