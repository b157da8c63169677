"""A deferral whose trigger fires at once: the race `[oellm] defer_settle_seconds` covers.

Copied beside a stack's DAG folder (on every component's PYTHONPATH) so the triggerer can import the
trigger; the `settle_probe` DAGs of stack_dags.py use it (tests/e2e/test_stack.py)."""

from __future__ import annotations

import atexit
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import TriggerEvent

from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers.base import ClusterTrigger, settle_deadline


class FireAtOnce(ClusterTrigger):
    """Its event is ready at the first look; only ClusterTrigger's hold delays it."""

    async def watch(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent({"ready_at": time.time()})


class DeferAtOnce(BaseOperator):
    """Defers to FireAtOnce, holding the event `hold` seconds, or `[oellm] defer_settle_seconds` if None.
    With `linger`, the task process stays that long after it has deferred, as a loaded worker does (seen
    up to 6 s): the race is then lost every time there is no hold."""

    def __init__(self, *, hold: float | None, linger: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold = hold
        self.linger = linger

    def execute(self, context: Any) -> None:
        if self.linger:
            atexit.register(time.sleep, self.linger)  # the task runner runs these before the process exits
        fire_after = settle_deadline() if self.hold is None else time.time() + self.hold
        trigger = FireAtOnce(cluster=ClusterTarget(local_commands=True), poll_interval=1, fire_after=fire_after)
        self.defer(trigger=trigger, method_name="resume")

    def resume(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        return event
