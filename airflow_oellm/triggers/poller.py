"""One status poll loop per cluster connection per triggerer process, however many jobs are watched.

Every trigger watching a job on the same connection subscribes to the same `JobPoller`; each
cycle runs one `squeue` for all subscribed ids (in chunks of 1,000) and one `sacct` for those no
longer in the queue, over one SSH connection. A failed cycle (dropped SSH, `Socket timed out`,
fork EAGAIN on a busy login node) is retried with backoff and jitter and reported to the
watchers only after `failure_threshold` consecutive failures, and never as a job state.

    async for update in JobPoller.shared(hook_factory, key=hook.key).watch(job_id):
        if update.status and update.status.is_terminal: ...
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar

from airflow_oellm.hooks.slurm import AsyncSlurmHook
from airflow_oellm.slurm.commands import SlurmCommandError
from airflow_oellm.slurm.states import JobStatus

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
FIRST_CHECK_AFTER = 3.0
MAX_BACKOFF = 300.0


@dataclass(frozen=True)
class PollUpdate:
    """A job's status from one cycle, or the error that made the cycle fail (status None)."""

    job_id: str
    status: JobStatus | None
    cycle: int
    error: str | None = None
    consecutive_failures: int = 0
    permanent: bool = False


def backoff(failures: int, interval: float, jitter: Callable[[], float] = random.random) -> float:
    """1, 2, 4, ... seconds, at most `max(interval, MAX_BACKOFF)`, each +-20 % jitter."""
    base = min(2.0 ** max(failures - 1, 0), max(interval, MAX_BACKOFF))
    return base * (0.8 + 0.4 * jitter())


class JobPoller:
    _registry: ClassVar[dict[tuple[str, int], JobPoller]] = {}

    def __init__(
        self,
        hook_factory: Callable[[], AsyncSlurmHook],
        *,
        key: str,
        interval: float = DEFAULT_INTERVAL,
        first_check_after: float = FIRST_CHECK_AFTER,
        failure_threshold: int = 3,
    ) -> None:
        self.key = key
        self.hook_factory = hook_factory
        self.hook: AsyncSlurmHook | None = None
        self.interval = interval
        self.first_check_after = first_check_after
        self.failure_threshold = failure_threshold
        self.cycles = 0
        self.failed_cycles = 0
        self.consecutive_failures = 0
        self._subscribers: dict[str, set[asyncio.Queue[PollUpdate]]] = {}
        self._due = time.monotonic() + first_check_after
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def shared(
        cls,
        hook_factory: Callable[[], AsyncSlurmHook],
        *,
        key: str,
        interval: float = DEFAULT_INTERVAL,
        first_check_after: float = FIRST_CHECK_AFTER,
        failure_threshold: int = 3,
    ) -> JobPoller:
        """The poller of this connection in this process (event loop); created on first use.

        With watchers asking for different intervals, the shortest one is used.
        """
        loop = asyncio.get_running_loop()
        registry_key = (key, id(loop))
        poller = cls._registry.get(registry_key)
        if poller is None or poller.loop is not loop:  # a finished loop's id may be reused
            poller = cls._registry[registry_key] = cls(
                hook_factory,
                key=key,
                interval=interval,
                first_check_after=first_check_after,
                failure_threshold=failure_threshold,
            )
            poller.loop = loop
        poller.interval = min(poller.interval, interval)
        return poller

    @property
    def watched(self) -> list[str]:
        return list(self._subscribers)

    async def watch(self, job_id: str) -> AsyncIterator[PollUpdate]:
        """Updates for one job, one per poll cycle, until the caller stops iterating."""
        queue: asyncio.Queue[PollUpdate] = asyncio.Queue()
        self._subscribers.setdefault(str(job_id), set()).add(queue)
        self._due = min(self._due, time.monotonic() + self.first_check_after)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"oellm-poller-{self.key}")
        try:
            while True:
                yield await queue.get()
        finally:
            subscribers = self._subscribers.get(str(job_id))
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[str(job_id)]
            self._wake.set()

    async def _sleep_until_due(self) -> None:
        while self._subscribers:
            remaining = self._due - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        try:
            while self._subscribers:
                await self._sleep_until_due()
                ids = list(self._subscribers)
                if not ids:
                    break
                await self._cycle(ids)
        finally:
            hook, self.hook = self.hook, None
            if hook is not None:
                await hook.close()
            for registry_key, poller in list(self._registry.items()):
                if poller is self and not self._subscribers:
                    del self._registry[registry_key]

    async def _cycle(self, ids: list[str]) -> None:
        self.cycles += 1
        if self.hook is None:
            self.hook = self.hook_factory()
        try:
            statuses = await self.hook.job_statuses(ids)
        except SlurmCommandError as exc:
            self.failed_cycles += 1
            self.consecutive_failures += 1
            delay = backoff(self.consecutive_failures, self.interval)
            log.warning(
                "poll of %d job(s) on %s failed (%d in a row, next try in %.0f s): %s",
                len(ids),
                self.key,
                self.consecutive_failures,
                delay,
                exc,
            )
            self._due = time.monotonic() + delay
            if self.consecutive_failures >= self.failure_threshold or not exc.transient:
                self._publish({j: None for j in ids}, error=str(exc), permanent=not exc.transient)
            return
        self.consecutive_failures = 0
        self._due = time.monotonic() + self.interval
        self._publish(statuses)

    def _publish(
        self, statuses: dict[str, JobStatus | None], *, error: str | None = None, permanent: bool = False
    ) -> None:
        for job_id, status in statuses.items():
            update = PollUpdate(job_id, status, self.cycles, error, self.consecutive_failures, permanent)
            for queue in self._subscribers.get(job_id, ()):
                queue.put_nowait(update)
