"""CheckpointSensor: wait until Megatron checkpoint N (or the first >= N) is complete."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.monitor.records import TrainingStatus
from airflow_oellm.monitor.waiting import Decision, checkpoint_decision
from airflow_oellm.slurm.identity import task_status_path
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget
from airflow_oellm.triggers.base import settle_deadline
from airflow_oellm.triggers.checkpoint import CheckpointTrigger


class CheckpointSensor(BaseSensorOperator):
    """Succeeds with `{"iteration", "path", "format"}` once the checkpoint is complete: the tracker
    file has reached it and its directory holds `metadata.json` (torch_dist) or
    `mp_rank_*/model_optim_rng.pt` (torch). A directory that merely exists is not enough.

    :param checkpoint_dir: Megatron's save directory.
    :param iteration: the checkpoint to wait for.
    :param at_least: accept the first complete checkpoint >= `iteration`.
    :param output_dir, training_task_id: where the training task beside this sensor publishes its
        status: when it failed for good or finished below `iteration`, the sensor ends at once.
    :param on_training_failure: "fail" or "skip" in that case (and when `iteration` can never appear).
    :param ssh_conn_id, cluster: where the job runs (as for `SlurmSubmitOperator`).
    """

    template_fields: Sequence[str] = ("checkpoint_dir", "iteration", "output_dir")
    ui_color = "#eef6e8"

    def __init__(
        self,
        *,
        checkpoint_dir: str,
        iteration: int | str,
        at_least: bool = False,
        output_dir: str | None = None,
        training_task_id: str | None = None,
        on_training_failure: str = "fail",
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        poll_interval: float = 60.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        if on_training_failure not in ("fail", "skip"):
            raise ValueError("on_training_failure must be 'fail' or 'skip'")
        self.checkpoint_dir = checkpoint_dir
        self.iteration = iteration
        self.at_least = at_least
        self.output_dir = output_dir
        self.training_task_id = training_task_id
        self.on_training_failure = on_training_failure
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.deferrable = deferrable

    def _status_path(self) -> str | None:
        if self.output_dir and self.training_task_id:
            return task_status_path(self.output_dir, self.training_task_id)
        return None

    def _trigger(self, context: Any) -> CheckpointTrigger:
        return CheckpointTrigger(
            checkpoint_dir=self.checkpoint_dir,
            iteration=int(self.iteration),
            at_least=self.at_least,
            training_status_path=self._status_path(),
            run_id=context["ti"].run_id,
            cluster=self.cluster,
            poll_interval=self.poll_interval,
            fire_after=settle_deadline(),
        )

    def execute(self, context: Any) -> Any:
        if self.deferrable:
            first = self.poke(context)  # a checkpoint that is already there needs no trigger
            if first.is_done:
                return first.xcom_value
            self.defer(trigger=self._trigger(context), method_name="execute_complete", timeout=self.execution_timeout)
        return super().execute(context)

    def poke(self, context: Any) -> PokeReturnValue:
        trigger = self._trigger(context)
        hook = SlurmHook(cluster=self.cluster)
        try:
            cycle = hook.poll_cycle([], trigger.request())
        finally:
            hook.close()
        status = TrainingStatus.from_json(cycle.chunks[0].data if cycle.chunks else None, trigger.run_id)
        decision = checkpoint_decision(
            cycle.checkpoints[0], self.checkpoint_dir, int(self.iteration), self.at_least, status
        )
        return PokeReturnValue(is_done=decision.done, xcom_value=self._result(decision) if decision.done else None)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        return self._result(Decision(event["kind"], event.get("message", ""), event.get("checkpoint")))

    def _result(self, decision: Decision) -> dict[str, Any]:
        if decision.kind == "ready":
            self.log.info(decision.message)
            return dict(decision.payload or {})
        message = f"checkpoint {self.iteration} of {self.checkpoint_dir} will not come: {decision.message}"
        if self.on_training_failure == "skip":
            raise AirflowSkipException(message)
        raise AirflowFailException(message)
