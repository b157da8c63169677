"""CheckpointTrigger: wait in the triggerer until Megatron checkpoint N is complete.

Each poll cycle probes the checkpoint directory and reads the training task's status file, in the
shared poller's one command for the whole cluster. Fires once: ready, never (N will not appear),
or the training ended (failed for good, or finished below N).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_oellm.monitor.records import STATUS_READ_LIMIT, TrainingStatus
from airflow_oellm.monitor.waiting import checkpoint_decision
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers.base import ClusterTrigger


class CheckpointTrigger(ClusterTrigger):
    fields = (*ClusterTrigger.fields, "checkpoint_dir", "iteration", "at_least", "training_status_path", "run_id")

    def __init__(
        self,
        *,
        checkpoint_dir: str,
        iteration: int,
        at_least: bool = False,
        training_status_path: str | None = None,
        run_id: str | None = None,
        cluster: ClusterTarget | Mapping[str, Any] | None = None,
        poll_interval: float = 60.0,
        fire_after: float | None = None,
        **before_cluster_target: Any,
    ) -> None:
        super().__init__(
            cluster=cluster,
            poll_interval=poll_interval,
            fire_after=fire_after,
            **before_cluster_target,
        )
        self.checkpoint_dir = checkpoint_dir
        self.iteration = int(iteration)
        self.at_least = at_least
        self.training_status_path = training_status_path
        self.run_id = run_id

    def request(self) -> CycleRequest:
        reads = [(self.training_status_path, 0, STATUS_READ_LIMIT)] if self.training_status_path else []
        return CycleRequest(reads=reads, checkpoints=[self.checkpoint_dir])

    async def watch(self) -> AsyncIterator[TriggerEvent]:
        async for update in self.poller().watch(None, self.request):
            if update.error:
                self.log.warning("cannot probe %s: %s", self.checkpoint_dir, update.error)
                continue
            status = TrainingStatus.from_json(update.chunks[0].data if update.chunks else None, self.run_id)
            decision = checkpoint_decision(
                update.checkpoints[0], self.checkpoint_dir, self.iteration, self.at_least, status
            )
            if decision.done:
                yield TriggerEvent(
                    {"kind": decision.kind, "message": decision.message, "checkpoint": dict(decision.payload or {})}
                )
                return
