"""LogEventTrigger: wait in the triggerer until a log event (with an optional condition) appears.

The job is given by id and log path, or followed through the training task's status file: then a
resubmission (a retry after a time limit) moves the watch to the new job's log. Fires once:
matched (with the event's groups), inactive (the log stopped growing while the job ran), or
ended (the job, or the training, finished without the event).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_oellm.monitor.events import EventSpec, event_specs
from airflow_oellm.monitor.records import STATUS_READ_LIMIT, TrainingStatus
from airflow_oellm.monitor.waiting import LogWait, event_condition
from airflow_oellm.monitor.watch import READ_BYTES
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers.base import ClusterTrigger


def resolve_event(event: str | dict[str, Any]) -> EventSpec:
    """A built-in event by name, or a spec in the seed guide's format."""
    if isinstance(event, str):
        for spec in event_specs():
            if spec.name == event:
                return spec
        raise ValueError(f"no built-in event named {event!r}; give a pattern instead")
    return EventSpec.from_dict(event)


class LogEventTrigger(ClusterTrigger):
    fields = (
        *ClusterTrigger.fields,
        "event",
        "condition",
        "job_id",
        "log_path",
        "training_status_path",
        "run_id",
        "inactivity_threshold",
    )

    def __init__(
        self,
        *,
        event: str | dict[str, Any],
        condition: str | None = None,
        job_id: str | None = None,
        log_path: str | None = None,
        training_status_path: str | None = None,
        run_id: str | None = None,
        inactivity_threshold: float | None = None,
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
        if not ((job_id and log_path) or training_status_path):
            raise ValueError("LogEventTrigger needs job_id and log_path, or training_status_path")
        self.event = event
        self.condition = condition
        self.job_id = job_id
        self.log_path = log_path
        self.training_status_path = training_status_path
        self.run_id = run_id
        self.inactivity_threshold = inactivity_threshold

    async def watch(self) -> AsyncIterator[TriggerEvent]:
        wait = LogWait(
            resolve_event(self.event),
            event_condition(self.condition),
            (self.job_id, self.log_path) if self.job_id and self.log_path else None,
            follows_training=bool(self.training_status_path),
            inactivity_threshold=self.inactivity_threshold,
        )
        poller = self.poller()

        def request() -> CycleRequest:
            reads = [(self.training_status_path, 0, STATUS_READ_LIMIT)] if self.training_status_path else []
            log = wait.read_request(READ_BYTES)
            return CycleRequest(reads=[*reads, *([log] if log else [])])

        while True:  # once per job followed: the poller watches one job id
            async for update in poller.watch(wait.target[0] if wait.target else None, request):
                if update.error:
                    self.log.warning("cannot poll: %s", update.error)
                    continue
                chunks = list(update.chunks)
                training = None
                if self.training_status_path:
                    training = TrainingStatus.from_json(chunks.pop(0).data, self.run_id)
                if wait.retarget(training):
                    self.log.info("following job %s (%s)", *wait.target)
                    break
                decision = wait.apply(time.time(), update.status, chunks[0] if chunks else None, training)
                if decision.kind != "wait":
                    yield TriggerEvent(decision.to_event())
                    return
