"""What every trigger of this provider shares: a cluster target, the shared poller, and a hold on
events that come too soon after the task deferred."""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from airflow.configuration import conf
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_oellm.hooks.slurm import AsyncSlurmHook
from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers.poller import JobPoller

# Airflow 3.3 fails a deferred task whose trigger fires before the executor has read the deferring
# worker's exit: that stale "success" arrives after the resume was queued under the same key and reads
# as a state changed externally (apache/airflow#66374 fixed only the `scheduled` case; #71580, #72716 are
# open). Nothing in the database or the API marks that moment, so the hold is a time, and a setting.
DEFAULT_DEFER_SETTLE_SECONDS = 15.0


def defer_settle_seconds() -> float:
    """`[oellm] defer_settle_seconds`: how long after a deferral its trigger may fire (docs/reliability.md)."""
    seconds = conf.getfloat("oellm", "defer_settle_seconds", fallback=DEFAULT_DEFER_SETTLE_SECONDS)
    if not 0 <= seconds < math.inf:
        raise ValueError(f"[oellm] defer_settle_seconds must be a number of seconds >= 0, not {seconds}")
    return seconds


def settle_deadline() -> float:
    """`fire_after` for a trigger created now, at deferral."""
    return time.time() + defer_settle_seconds()


def trigger_cluster(
    cluster: ClusterTarget | Mapping[str, Any] | None, before_cluster_target: Mapping[str, Any]
) -> ClusterTarget:
    """A trigger's target: `cluster` as it serializes, or the three arguments a trigger serialized before
    there was one (`ssh_conn_id`, `local`, `batch_system`): a triggerer upgraded under deferred tasks
    still resumes their watches."""
    unknown = set(before_cluster_target) - {"ssh_conn_id", "local", "batch_system"}
    if unknown:
        raise TypeError(f"unexpected trigger arguments: {', '.join(sorted(unknown))}")
    if cluster is not None:
        return ClusterTarget.of(cluster)
    return ClusterTarget.of_0_1(before_cluster_target.get("ssh_conn_id"), before_cluster_target)


class ClusterTrigger(BaseTrigger):
    """Serializes the attributes named in `fields` (the cluster target as its dict, the rest JSON-safe);
    polls through the target's shared poller.

    Subclasses implement `watch()`; `run()` passes its events on, none before `fire_after` (epoch seconds).
    """

    fields: ClassVar[tuple[str, ...]] = ("cluster", "poll_interval", "fire_after")

    def __init__(
        self,
        *,
        cluster: ClusterTarget | Mapping[str, Any] | None,
        poll_interval: float,
        fire_after: float | None = None,
        **before_cluster_target: Any,
    ) -> None:
        super().__init__()
        self.cluster = trigger_cluster(cluster, before_cluster_target)
        self.poll_interval = poll_interval
        self.fire_after = fire_after

    def serialize(self) -> tuple[str, dict[str, Any]]:
        kwargs = {f: getattr(self, f) for f in self.fields}
        return f"{type(self).__module__}.{type(self).__qualname__}", {**kwargs, "cluster": self.cluster.as_dict()}

    def hook(self) -> AsyncSlurmHook:
        return AsyncSlurmHook(cluster=self.cluster)

    def poller(self, start_estimate_interval: float = 0.0) -> JobPoller:
        key, interval = self.cluster.key, self.poll_interval
        return JobPoller.shared(self.hook, key=key, interval=interval, start_estimate_interval=start_estimate_interval)

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[TriggerEvent]:
        """The trigger's own polling; yields its one event."""

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async for event in self.watch():
            wait = (self.fire_after or 0.0) - time.time()
            if wait > 0:
                self.log.info("holding the event %.1f s: the deferring worker may not have exited yet", wait)
                await asyncio.sleep(wait)
            yield event
