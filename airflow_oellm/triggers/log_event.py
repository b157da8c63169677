"""LogEventTrigger: wait in the triggerer until a log event (with an optional condition) appears.

The job is given by id and log path, or followed through the training task's status file: then a
resubmission (a retry after a time limit) moves the watch to the new job's log. Fires once:
matched (with the event's groups), inactive (the log stopped growing while the job ran), or
ended (the job, or the training, finished without the event).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_oellm.monitor.events import EventMatcher, EventSpec, event_specs
from airflow_oellm.monitor.inactivity import Activity
from airflow_oellm.monitor.waiting import FINAL_TRAINING_STATES, event_condition, event_satisfies, training_status
from airflow_oellm.monitor.watch import READ_BYTES
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.slurm.states import JobState
from airflow_oellm.triggers.base import ClusterTrigger

STATUS_READ_LIMIT = 64 * 1024


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
        ssh_conn_id: str | None = None,
        local: bool = False,
        batch_system: str = "slurm",
        poll_interval: float = 60.0,
        fire_after: float | None = None,
    ) -> None:
        super().__init__(
            ssh_conn_id=ssh_conn_id,
            local=local,
            batch_system=batch_system,
            poll_interval=poll_interval,
            fire_after=fire_after,
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
        spec = resolve_event(self.event)
        condition = event_condition(self.condition)

        poller = self.poller()
        target = (self.job_id, self.log_path) if self.job_id else None
        while True:
            matcher = EventMatcher([spec])
            activity = Activity(last_change=time.time())
            switch = None

            def request(current: tuple[str, str] | None = target, m: EventMatcher = matcher) -> CycleRequest:
                reads = [(self.training_status_path, 0, STATUS_READ_LIMIT)] if self.training_status_path else []
                if current is not None:
                    reads.append((current[1], m.offset, READ_BYTES))
                return CycleRequest(reads=reads)

            async for update in poller.watch(target[0] if target else None, request):
                if update.error:
                    self.log.warning("cannot poll: %s", update.error)
                    continue
                chunks = list(update.chunks)
                training = None
                if self.training_status_path:
                    training = training_status(chunks.pop(0).data, self.run_id)
                    if training and training.get("job_id") and (target is None or training["job_id"] != target[0]):
                        switch = (str(training["job_id"]), training["log_path"])
                        break
                if target is None:
                    if training and training.get("state") in FINAL_TRAINING_STATES:
                        yield TriggerEvent(
                            {
                                "kind": "ended",
                                "message": f"the training {training['state']} without the event {spec.name}",
                            }
                        )
                        return
                    continue
                chunk = chunks[0] if chunks else None
                finished = update.status is not None and update.status.is_terminal
                _, events = matcher.feed(
                    chunk.data if chunk else b"",
                    final=finished and chunk is not None and chunk.size is not None and chunk.end >= chunk.size,
                )
                for event in events:
                    if event_satisfies(condition, event.groups):
                        yield TriggerEvent({"kind": "matched", "job_id": target[0], **event.to_dict()})
                        return
                running = update.status is not None and update.status.state is JobState.RUNNING
                activity = activity.observe(
                    time.time(), running=running, log_size=chunk.size if chunk and chunk.size is not None else None
                )
                if self.inactivity_threshold and activity.is_hung(time.time(), self.inactivity_threshold):
                    yield TriggerEvent(
                        {
                            "kind": "inactive",
                            "job_id": target[0],
                            "message": f"log {target[1]} did not grow for {self.inactivity_threshold:.0f} s",
                        }
                    )
                    return
                drained = chunk is None or chunk.size is None or chunk.end >= chunk.size
                if finished and drained:
                    still_training = training is not None and training.get("state") not in FINAL_TRAINING_STATES
                    if self.training_status_path and (training is None or still_training):
                        continue  # a retry will submit the next job: follow it
                    yield TriggerEvent(
                        {
                            "kind": "ended",
                            "job_id": target[0],
                            "message": f"job {target[0]} ended ({update.status.state.value}) without the event "
                            f"{spec.name}",
                        }
                    )
                    return
            if switch is not None:
                self.log.info("following job %s (%s)", *switch)
                target = switch
