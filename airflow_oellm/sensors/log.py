"""SlurmLogSensor: wait until a log event (optionally with a condition) appears in a job's log."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException

from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.monitor.records import STATUS_READ_LIMIT, TrainingStatus
from airflow_oellm.monitor.waiting import LogWait, event_condition
from airflow_oellm.monitor.watch import DRAIN_BYTES
from airflow_oellm.slurm.identity import task_status_path
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget
from airflow_oellm.triggers.base import settle_deadline
from airflow_oellm.triggers.log_event import LogEventTrigger, resolve_event


class SlurmLogSensor(BaseSensorOperator):
    """Returns the event's groups (e.g. `{"iteration": 50000, "loss": 2.1, ...}`) once it appears.

    :param event: a built-in event name (`iteration`, `checkpoint_saved`, `validation`, ...) or a
        spec in the seed guide's format (`name`, `pattern`, `extract_groups`, `metadata`).
    :param condition: an expression over the groups, e.g. `iteration >= 50000`.
    :param job_id, log_path: the job to watch; or
    :param output_dir, training_task_id: follow the training task beside this sensor, across its
        resubmissions (each attempt's log in turn).
    :param inactivity_threshold: fail when the log does not grow for this long while the job runs.
    :param ssh_conn_id, cluster: where the job runs (as for `SlurmSubmitOperator`).

    Fails when the watched job (or the followed training) ends without the event. Waits in the
    triggerer by default; `deferrable=False` pokes from the worker (in `poke` mode the read position
    is kept between pokes; in `reschedule` mode each poke reads the log again from the start).
    """

    template_fields: Sequence[str] = ("job_id", "log_path", "output_dir", "condition")
    ui_color = "#f6f0e8"

    def __init__(
        self,
        *,
        event: str | dict[str, Any],
        condition: str | None = None,
        job_id: str | None = None,
        log_path: str | None = None,
        output_dir: str | None = None,
        training_task_id: str | None = None,
        inactivity_threshold: float | None = None,
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        poll_interval: float = 60.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        resolve_event(event)  # an unknown built-in name fails when the DAG is parsed, not hours later
        if not ((job_id and log_path) or (output_dir and training_task_id)):
            raise ValueError(f"{self.task_id}: give job_id and log_path, or output_dir and training_task_id")
        self.event = event
        self.condition = condition
        self.job_id = job_id
        self.log_path = log_path
        self.output_dir = output_dir
        self.training_task_id = training_task_id
        self.inactivity_threshold = inactivity_threshold
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self._wait: LogWait | None = None

    def _status_path(self) -> str | None:
        return task_status_path(self.output_dir, self.training_task_id) if self.training_task_id else None

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        status_path = self._status_path()
        self.defer(
            trigger=LogEventTrigger(
                event=self.event,
                condition=self.condition,
                job_id=self.job_id,
                log_path=self.log_path,
                training_status_path=status_path,
                run_id=context["ti"].run_id,
                inactivity_threshold=self.inactivity_threshold,
                cluster=self.cluster,
                poll_interval=self.poll_interval,
                fire_after=settle_deadline(),
            ),
            method_name="execute_complete",
            timeout=self.execution_timeout,
        )

    def poke(self, context: Any) -> PokeReturnValue:
        if self._wait is None:  # kept between pokes in poke mode; reschedule mode starts over each time
            target = (str(self.job_id), self.log_path) if self.job_id and self.log_path else None
            self._wait = LogWait(
                resolve_event(self.event),
                event_condition(self.condition),
                target,
                follows_training=bool(self._status_path()),
                inactivity_threshold=self.inactivity_threshold,
            )
        wait = self._wait
        hook = SlurmHook(cluster=self.cluster)
        try:
            training = None
            if self._status_path():
                status_file = hook.read_range(self._status_path(), 0, STATUS_READ_LIMIT)
                training = TrainingStatus.from_json(status_file.data, context["ti"].run_id)
                wait.retarget(training)
            log = wait.read_request(DRAIN_BYTES)
            cycle = hook.poll_cycle([wait.target[0]], CycleRequest(reads=[log])) if wait.target and log else None
        finally:
            hook.close()
        status = cycle.statuses[wait.target[0]] if cycle else None
        decision = wait.apply(time.time(), status, cycle.chunks[0] if cycle else None, training)
        if decision.kind == "matched" and decision.event is not None:
            event = decision.event
            self.log.info("event %s at line %d of job %s: %s", event.name, event.line_no, decision.job_id, event.line)
            return PokeReturnValue(is_done=True, xcom_value=event.groups)
        if decision.kind != "wait":
            raise AirflowFailException(decision.message)
        return PokeReturnValue(is_done=False)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if event["kind"] == "matched":
            self.log.info(
                "event %s at line %d of job %s: %s", event["name"], event["line_no"], event["job_id"], event["line"]
            )
            return event["groups"]
        raise AirflowFailException(event.get("message") or f"log watch ended: {event['kind']}")
