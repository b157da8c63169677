"""The W&B run and TensorBoard links of a training or cooldown task.

Airflow 3 calls `get_link` when the task process ends, a deferral included, and keeps the answer as an
XCom the UI reads; so the links are there while the job trains. They are made from the task's own
rendered config (no I/O): an operator without an experiment config (a plain script) has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

from airflow_oellm.config.errors import ConfigError
from airflow_oellm.config.milestones import COOLDOWN, typed_job
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.config.tracking import tensorboard_dir, tensorboard_url, wandb_run
from airflow_oellm.hooks.alerting import dashboard_link

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey


def training_config(operator: Any) -> RootConfig | None:
    """The config of the training (or cooldown) an operator runs; None for a side job or a plain script."""
    experiment, job = getattr(operator, "experiment", None), getattr(operator, "job", None)
    if not isinstance(experiment, Mapping) or (job and (not isinstance(job, Mapping) or job.get("kind") != COOLDOWN)):
        return None
    try:
        return typed_job(experiment, job)
    except ConfigError:
        return None


class WandbRunLink(BaseOperatorLink):
    """The training's W&B run (one across its attempts; a cooldown's own)."""

    name = "W&B run"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        cfg = training_config(operator)
        run = wandb_run(cfg) if cfg is not None else None
        return (run.url if run is not None else None) or ""


class TensorBoardLink(BaseOperatorLink):
    """`tracking.tensorboard.url` for the training's log directory, else the experiment's dashboard page,
    which names the directory."""

    name = "TensorBoard"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        cfg = training_config(operator)
        if cfg is None or tensorboard_dir(cfg) is None:
            return ""
        page = dashboard_link(
            {"dashboard_url": cfg.notifications.dashboard_url}, dag_id=ti_key.dag_id, run_id=ti_key.run_id
        )
        return tensorboard_url(cfg) or (f"{page}#tracking" if page else "")
