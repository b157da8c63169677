"""WandbSyncOperator: push a training's offline W&B runs from the cluster's login node."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_oellm.config.errors import ConfigError
from airflow_oellm.config.milestones import typed_job
from airflow_oellm.config.tracking import wandb_run
from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.operators.submit import as_data, looked_up_secrets
from airflow_oellm.slurm.identity import workspace_key
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget


class WandbSyncOperator(BaseOperator):
    """Push the offline W&B runs of a training (or of a cooldown, `job`) with `wandb sync` on the login node,
    over the cluster's own connection, with the config's `platform.secrets` (`WANDB_API_KEY`) on stdin.

    Idempotent: each attempt's offline run is pushed once, after its job ended; while a job still writes
    on the training's output directory, its run waits for a later sync (slurm/offline_runs.py says why).
    Nothing to push (W&B online, off, or no run yet) is a success that says so. A run wandb could not push
    fails the task, which retries; it never holds up a training.

    :param experiment: the resolved experiment config (an XCom reference resolves at run time).
    :param job: `{"kind": "cooldown", "cooldown": i}` for a cooldown's runs.
    :param cluster, ssh_conn_id: where the runs are (as for `SlurmSubmitOperator`).
    """

    template_fields: Sequence[str] = ("experiment", "job")
    ui_color = "#fdf3e1"

    def __init__(
        self,
        *,
        experiment: Mapping[str, Any] | Any,
        job: Mapping[str, Any] | Any | None = None,
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        **kwargs: Any,
    ) -> None:
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        self.experiment = as_data(experiment)
        self.job = as_data(job)
        self.cluster = cluster

    def execute(self, context: Any) -> dict[str, Any]:
        try:
            cfg = typed_job(self.experiment, self.job)
        except ConfigError as exc:
            raise AirflowFailException(f"invalid experiment config: {exc}") from None
        run = wandb_run(cfg)
        if run is None or not run.synced:
            why = (
                "nothing logs to W&B" if run is None else "its W&B run is online" if not run.offline else "sync is off"
            )
            self.log.info("Nothing to sync: %s", why)
            return {"run_id": run.run_id if run else None, "url": run.url if run else None, "nothing": why}
        hook = SlurmHook(cluster=self.cluster)
        try:
            result = hook.sync_offline_runs(
                run.offline_dir,
                run.run_id,
                run.sync_command,
                env=run.sync_env(),
                secrets=looked_up_secrets(cfg.platform.secrets),
                workspace_key=workspace_key(cfg.experiment.output_dir),
            )
        finally:
            hook.close()
        self.log.info("W&B run %s (%s): %s", run.run_id, run.url or "no link without an entity", result.summary())
        for directory in result.busy:
            self.log.info("%s is still written by a running job: a later sync pushes it", directory)
        if result.failed:
            failures = "; ".join(f"{directory}: {said}" for directory, said in result.failed)
            raise AirflowException(f"wandb sync could not push {len(result.failed)} offline run(s): {failures}")
        return {"run_id": run.run_id, "url": run.url, **asdict(result)}
