"""SlurmJobTrigger: follow one training job from the triggerer until it ends.

Through the shared poller it gets the job's state and the new bytes of its log every cycle (one
remote command for all triggers on the cluster); it streams new lines into the task's log,
matches log events, cancels a hung or diverged job, and keeps its position and event summary in a small state
file on the cluster, so a restarted triggerer continues at the same byte. It fires one event when
the job has ended and its log is read to the end. While the job runs it keeps the task's `progress`
XCom up to date (iteration, loss, throughput): what the dashboard shows without asking the cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_oellm.config.naming import PROGRESS_KEY
from airflow_oellm.hooks.alerting import OutageAlerts
from airflow_oellm.monitor.orphans import state_key
from airflow_oellm.monitor.outage import DEFAULT_MAX_OUTAGE_SECONDS
from airflow_oellm.monitor.retention import retention_notice
from airflow_oellm.monitor.watch import JobFollower
from airflow_oellm.notifications import first_to_tell, tell
from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers.base import ClusterTrigger

# The event loop keeps only weak references to tasks: these are on_kill's, which may outlive their trigger.
_KILLS_UNDER_WAY: set[asyncio.Future[None]] = set()


class SlurmJobTrigger(ClusterTrigger):
    """Fires `{"kind": "finished", ...}` once the job ended (or `{"kind": "error", ...}` if the cluster
    stays unreachable for good)."""

    fields = (
        *ClusterTrigger.fields,
        "job_id",
        "log_path",
        "state_path",
        "events",
        "inactivity_threshold",
        "nan_limit",
        "anomalies",
        "rewind",
        "status_path",
        "status",
        "loss_baseline",
        "retention",
        "checkpoint_dir",
        "branches",
        "output_paths",
        "stream_log",
        "progress_to",
        "max_outage",
        "on_outage",
        "notify_outage_after",
        "outage_alerts",
        "stop_request_path",
        "start_estimate_interval",
    )

    def __init__(
        self,
        *,
        job_id: str,
        log_path: str,
        state_path: str,
        cluster: ClusterTarget | Mapping[str, Any] | None = None,
        events: list[dict[str, Any]] | None = None,
        inactivity_threshold: float | None = None,
        nan_limit: int = 0,
        anomalies: dict[str, Any] | None = None,
        rewind: bool = False,
        status_path: str | None = None,
        status: str | None = None,
        loss_baseline: list[float] | None = None,
        retention: dict[str, int] | None = None,
        checkpoint_dir: str | None = None,
        branches: dict[str, list[str]] | None = None,
        output_paths: list[str] | None = None,
        poll_interval: float = 60.0,
        fire_after: float | None = None,
        stream_log: bool = True,
        progress_to: dict[str, Any] | None = None,
        max_outage: float | None = DEFAULT_MAX_OUTAGE_SECONDS,
        on_outage: str | None = None,
        notify_outage_after: float | None = None,
        outage_alerts: dict[str, Any] | None = None,
        stop_request_path: str | None = None,
        start_estimate_interval: float = 0.0,
        **before_cluster_target: Any,
    ) -> None:
        super().__init__(
            cluster=cluster,
            poll_interval=poll_interval,
            fire_after=fire_after,
            **before_cluster_target,
        )
        self.job_id = str(job_id)
        self.log_path = log_path
        self.state_path = state_path
        self.events = list(events or [])
        self.inactivity_threshold = inactivity_threshold
        self.nan_limit = nan_limit
        self.anomalies = dict(anomalies) if anomalies is not None else None  # AnomalySettings.to_dict()
        self.rewind = rewind  # a diverged loss stops the job to be rewound
        self.status_path, self.status = status_path, status  # the training's status file, and what it says
        self.loss_baseline = list(loss_baseline or [])  # the training's losses before this job resumed it
        # checkpoint retention (RetentionSettings.to_dict()), in checkpoint_dir; branches: {iteration: status
        # files of the branch tasks starting from it} (string keys: the trigger's kwargs are JSON)
        self.retention = dict(retention) if retention else None
        self.checkpoint_dir = checkpoint_dir
        self.branches = {str(k): list(v) for k, v in (branches or {}).items()}
        self.output_paths = list(output_paths or [])
        self.stream_log = stream_log
        # the task instance whose `progress` XCom follows the job: dag_id, run_id, task_id, map_index
        self.progress_to = dict(progress_to) if progress_to else None
        self.stop_request_path = stop_request_path  # a training in a sweep with early stopping
        self.start_estimate_interval = start_estimate_interval  # its pending job's expected start (0: never asked)
        self.max_outage = max_outage
        self.on_outage = on_outage  # platform.on_outage.callback, told after notify_outage_after seconds
        # the sweep's notifiers that hear of outages: {"sweep", "notifications", "link"} (OutageAlerts.to_dict())
        self.outage_alerts = dict(outage_alerts) if outage_alerts else None
        self.notify_outage_after = notify_outage_after if on_outage or outage_alerts else None

    async def watch(self) -> AsyncIterator[TriggerEvent]:
        follower = JobFollower.from_args({name: getattr(self, name) for name in self.fields}, self.cluster.name)
        poller = self.poller(self.start_estimate_interval)
        async for update in poller.watch(self.job_id, follower.request):
            step = follower.on_update(update, time.time())
            if step.poll_again:
                poller.soon()
            for level, notice in step.notices:
                self.log.log(level, notice)
            if self.stream_log:
                for line in step.lines:
                    self.log.info("[job %s] %s", self.job_id, line)
            for level, notice in step.later:
                self.log.log(level, notice)
            if step.notify is not None and self.on_outage:
                await self._tell(step.notify)
            if step.notify is not None and self.outage_alerts:
                await self._alert_outage(step.notify)
            if step.error:
                yield TriggerEvent({"kind": "error", "job_id": self.job_id, "message": step.error})
                return
            if step.cancel:
                await self._cancel(kill=step.kill)
            if step.delete:
                await self._retain(step.delete)
            if step.finished:
                yield TriggerEvent(follower.result(await self._read_tail(follower)))
                return
            if step.publish is not None:
                await self._publish(step.publish)
            if step.publish_outage is not None:
                await self._publish(step.publish_outage, outage_only=True)

    async def _publish(self, snapshot: dict[str, Any], outage_only: bool = False) -> None:
        """The task's `progress` XCom (it is a view: a failed write is no fault); `outage_only`: the outage,
        set in the progress published last."""
        if self.progress_to is None:
            return
        from airflow.sdk.execution_time.xcom import XCom

        try:
            if outage_only:
                try:
                    published = await XCom.aget_one(key=PROGRESS_KEY, **self.progress_to)
                except AttributeError:  # dag.test()'s in-process supervisor only answers synchronously
                    published = XCom.get_one(key=PROGRESS_KEY, **self.progress_to)
                snapshot = {**(published if isinstance(published, dict) else {}), "outage": snapshot}
            try:
                await XCom.aset(PROGRESS_KEY, snapshot, **self.progress_to)
            except AttributeError:  # dag.test()'s in-process supervisor only sends synchronously
                XCom.set(PROGRESS_KEY, snapshot, **self.progress_to)
        except Exception as exc:
            self.log.warning("could not record the progress of job %s: %s", self.job_id, exc)

    async def _tell(self, notice: dict[str, Any]) -> None:
        """The outage callback, once per outage and cluster in this triggerer, in a thread."""
        if not first_to_tell(self.on_outage, self.cluster.key, notice):
            return
        notice = {**notice, "outage": {**notice["outage"], "watches": len(self.poller().watched)}}
        try:
            await asyncio.wait_for(asyncio.to_thread(tell, self.on_outage, notice, self.log), 120)
        except TimeoutError:
            self.log.warning("platform.on_outage.callback %s took over 120 s; not waited for", self.on_outage)

    async def _alert_outage(self, notice: dict[str, Any]) -> None:
        """The sweep's `outage` alert, once per outage and cluster in this triggerer, in a thread (a webhook's
        secret reference is looked up through the triggerer's supervisor)."""
        alerts = OutageAlerts.from_dict(self.outage_alerts or {})
        if not first_to_tell(alerts.key, self.cluster.key, notice):
            return
        from asgiref.sync import sync_to_async

        try:
            await asyncio.wait_for(sync_to_async(alerts.send)(notice, self.log), 120)
        except TimeoutError:
            self.log.warning("the outage alert of sweep %s took over 120 s; not waited for", alerts.sweep)

    async def _read_tail(self, follower: JobFollower) -> bytes:
        """Save the final state and read the log's end."""
        hook = self.hook()
        try:
            cycle = await hook.poll_cycle([], follower.final_request())
            return cycle.chunks[0].data
        except Exception as exc:  # the event carries the summary; the tail only sharpens classification
            self.log.warning("could not save the state / read the log end of job %s: %s", self.job_id, exc)
            return b""
        finally:
            await hook.close()

    async def _retain(self, deletions: list[tuple[int, tuple[str, ...]]]) -> None:
        """Retention: delete the checkpoints the watch let go (a failure is logged; the next save tries again)."""
        hook = self.hook()
        try:
            deleted, kept = await asyncio.wait_for(hook.delete_checkpoints(str(self.checkpoint_dir), deletions), 120)
            self.log.info("job %s: %s", self.job_id, retention_notice(str(self.checkpoint_dir), deleted, kept))
        except Exception as exc:
            self.log.warning("retention could not delete checkpoints of job %s: %s", self.job_id, exc)
        finally:
            await hook.close()

    async def _cancel(self, *, kill: bool = False) -> None:
        hook = self.hook()
        try:
            await asyncio.wait_for(hook.kill([self.job_id]) if kill else hook.cancel([self.job_id]), 60)
        finally:
            await hook.close()

    async def on_kill(self) -> None:
        """The user killed the task (mark failed / clear): stop the job too.

        Airflow 3.3 also calls `on_kill` when it moves a trigger to another triggerer (one that missed its
        heartbeats under load): the task is still deferred then, and its job must go on.

        Until the trigger has ended, the triggerer cancels it again on every loop (about a second), which
        interrupts `on_kill` too: under load that cut the scancel short and left the job queued. So the work
        runs as its own task, which those repeats do not reach, and ends in the triggerer's event loop.
        """
        work = asyncio.ensure_future(self._stop_job_unless_moved())
        _KILLS_UNDER_WAY.add(work)
        work.add_done_callback(_KILLS_UNDER_WAY.discard)
        await asyncio.shield(work)

    async def _stop_job_unless_moved(self) -> None:
        try:
            state = await self._task_state()
            if state == "deferred":
                self.log.info(
                    "trigger moved to another triggerer (the task is still deferred): job %s goes on", self.job_id
                )
                return
            self.log.info("task killed (now %s): cancelling job %s", state, self.job_id)
            await self._cancel()
            self.log.info("job %s cancelled", self.job_id)
        except Exception as exc:  # nobody awaits this task once the trigger has ended: say it here
            self.log.warning(
                "could not cancel job %s: %s; oellm_reconcile cancels it once it finds no task following it",
                self.job_id,
                exc,
            )

    async def _task_state(self) -> str | None:
        """The state of the task instance that deferred to this trigger (None: not known)."""
        if self.progress_to is None:
            return None
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        task = self.progress_to
        try:
            states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
                dag_id=task["dag_id"], task_ids=[task["task_id"]], run_ids=[task["run_id"]]
            )
        except Exception as exc:  # no answer: the user's action stands
            self.log.warning("could not read the state of %s: %s", task["task_id"], exc)
            return None
        return (states.get(task["run_id"]) or {}).get(state_key(task["task_id"], task["map_index"]))
