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
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_oellm.monitor.events import event_specs
from airflow_oellm.monitor.watch import JobWatch, WatchState
from airflow_oellm.slurm.operations import CycleRequest
from airflow_oellm.triggers.base import ClusterTrigger

PROGRESS_XCOM_KEY = "progress"
STATE_READ_LIMIT = 1024 * 1024
SAVE_EVERY = 60.0  # seconds between saves of the watch state without noteworthy events
PERMANENT_ERROR_GRACE = 600.0  # seconds a non-transient connection error may last before the task is told


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
        "output_paths",
        "stream_log",
        "progress_to",
    )

    def __init__(
        self,
        *,
        job_id: str,
        log_path: str,
        state_path: str,
        ssh_conn_id: str | None = None,
        local: bool = False,
        batch_system: str = "slurm",
        events: list[dict[str, Any]] | None = None,
        inactivity_threshold: float | None = None,
        nan_limit: int = 0,
        output_paths: list[str] | None = None,
        poll_interval: float = 60.0,
        fire_after: float | None = None,
        stream_log: bool = True,
        progress_to: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            ssh_conn_id=ssh_conn_id,
            local=local,
            batch_system=batch_system,
            poll_interval=poll_interval,
            fire_after=fire_after,
        )
        self.job_id = str(job_id)
        self.log_path = log_path
        self.state_path = state_path
        self.events = list(events or [])
        self.inactivity_threshold = inactivity_threshold
        self.nan_limit = nan_limit
        self.output_paths = list(output_paths or [])
        self.stream_log = stream_log
        # the task instance whose `progress` XCom follows the job: dag_id, run_id, task_id, map_index
        self.progress_to = dict(progress_to) if progress_to else None
        self._published: tuple[Any, ...] | None = None

    async def watch(self) -> AsyncIterator[TriggerEvent]:
        specs = event_specs(self.events)
        watch: JobWatch | None = None
        pending_write: bytes | None = None
        error_since: float | None = None
        saved_at = 0.0

        def request() -> CycleRequest:
            if watch is None:  # first: what an earlier triggerer knew
                return CycleRequest(reads=[(self.state_path, 0, STATE_READ_LIMIT)])
            writes = [(self.state_path, pending_write)] if pending_write is not None else []
            return CycleRequest(reads=[watch.read_request()], stats=self.output_paths, writes=writes)

        async for update in self.poller().watch(self.job_id, request):
            now = time.time()
            if update.error:
                self.log.warning(
                    "cannot poll job %s (%d failures in a row): %s",
                    self.job_id,
                    update.consecutive_failures,
                    update.error,
                )
                error_since = error_since or now
                if update.permanent and now - error_since > PERMANENT_ERROR_GRACE:
                    yield TriggerEvent({"kind": "error", "job_id": self.job_id, "message": update.error})
                    return
                continue
            error_since = None
            if watch is None:
                watch = self._restore(update.chunks[0].data if update.chunks else b"", now, specs)
                continue
            if pending_write is not None and update.writes_ok and all(update.writes_ok):
                pending_write, saved_at = None, now
            step = watch.apply(now, update.status, update.chunks[0] if update.chunks else None, update.mtimes)
            if step.truncated:
                self.log.info("[job %s] log restarted from the beginning (truncated by a requeue)", self.job_id)
            if step.skipped:
                self.log.warning(
                    "[job %s] the log grows faster than it is read: skipped %d bytes", self.job_id, step.skipped
                )
            if self.stream_log:
                for line in step.lines:
                    self.log.info("[job %s] %s", self.job_id, line)
            for event in step.events:
                if event.name != "iteration":
                    self.log.info("event %s at line %d: %s", event.name, event.line_no, event.groups)
            if step.stop_reason:
                self.log.warning("job %s: %s: cancelling it", self.job_id, step.stop_reason)
                watch.state.cancelled_by_us = True
                await self._cancel()
            if step.finished:
                tail = await self._finish(watch)
                yield TriggerEvent({"kind": "finished", **watch.result(tail)})
                return
            await self._publish(watch, update.status, now)
            # saved with the next cycle: at once after a checkpoint, a validation, a hang; else once a minute
            if step.noteworthy or now - saved_at >= SAVE_EVERY:
                pending_write = watch.state.to_json()

    async def _publish(self, watch: JobWatch, status: Any, now: float) -> None:
        """The task's `progress` XCom, when something changed (it is a view: a failed write is no fault)."""
        mark = watch.progress_mark(status)
        if self.progress_to is None or mark == self._published:
            return
        from airflow.sdk.execution_time.xcom import XCom

        snapshot = watch.progress(status, now)
        try:
            try:
                await XCom.aset(PROGRESS_XCOM_KEY, snapshot, **self.progress_to)
            except AttributeError:  # dag.test()'s in-process supervisor only sends synchronously
                XCom.set(PROGRESS_XCOM_KEY, snapshot, **self.progress_to)
            self._published = mark
        except Exception as exc:
            self.log.warning("could not record the progress of job %s: %s", self.job_id, exc)
            self._published = mark  # tried: the next change tries again

    def _restore(self, saved: bytes, now: float, specs: list[Any]) -> JobWatch:
        state = WatchState.from_json(saved, self.job_id, self.log_path) if saved else None
        if state is not None:
            self.log.info(
                "resuming the watch of job %s at byte %d of %s",
                self.job_id,
                state.matcher.get("offset", 0),
                self.log_path,
            )
        return JobWatch(
            specs,
            state or WatchState(self.job_id, self.log_path),
            inactivity_threshold=self.inactivity_threshold,
            now=now,
            nan_limit=self.nan_limit,
        )

    async def _finish(self, watch: JobWatch) -> bytes:
        """Save the final state (a late restart then cannot replay the ending) and read the log's end."""
        hook = self.hook()
        try:
            cycle = await hook.poll_cycle(
                [], CycleRequest(reads=[watch.tail_request()], writes=[(self.state_path, watch.state.to_json())])
            )
            return cycle.chunks[0].data
        except Exception as exc:  # the event carries the summary; the tail only sharpens classification
            self.log.warning("could not save the state / read the log end of job %s: %s", self.job_id, exc)
            return b""
        finally:
            await hook.close()

    async def _cancel(self) -> None:
        hook = self.hook()
        try:
            await asyncio.wait_for(hook.cancel([self.job_id]), 60)
        finally:
            await hook.close()

    async def on_kill(self) -> None:
        """The user killed the task (mark failed / clear): stop the job too."""
        self.log.info("task killed: cancelling job %s", self.job_id)
        await self._cancel()
