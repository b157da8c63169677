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
from airflow_oellm.slurm.operations import CycleRequest, PollUpdate
from airflow_oellm.slurm.pending import StartEstimates

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
FIRST_CHECK_AFTER = 3.0
SOON_AFTER = 0.5  # seconds: a cycle asked for at once waits this long for others asking too
MAX_BACKOFF = 300.0


@dataclass(eq=False)
class _Watcher:
    job_id: str | None
    request: Callable[[], CycleRequest] | None
    queue: asyncio.Queue[PollUpdate]


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
        start_estimate_interval: float = 0.0,
    ) -> None:
        self.key = key
        self.hook_factory = hook_factory
        self.hook: AsyncSlurmHook | None = None
        self.interval = interval
        self.first_check_after = first_check_after
        self.failure_threshold = failure_threshold
        # the pending jobs' expected starts: one `squeue --start` for all of them, rarely (0: never)
        self.start_estimates = StartEstimates(start_estimate_interval)
        self.cycles = 0
        self.failed_cycles = 0
        self.consecutive_failures = 0
        self.failing_since: float | None = None  # epoch seconds of the first failed cycle in a row
        self._watchers: list[_Watcher] = []
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
        start_estimate_interval: float = 0.0,
    ) -> JobPoller:
        """The poller of this connection in this process (event loop); created on first use.

        With watchers asking for different intervals, the shortest one is used (start estimates: the
        shortest above 0).
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
        if start_estimate_interval > 0:
            current = poller.start_estimates.interval
            poller.start_estimates.interval = (
                min(current, start_estimate_interval) if current > 0 else (start_estimate_interval)
            )
        return poller

    @property
    def watched(self) -> list[str]:
        return list(dict.fromkeys(w.job_id for w in self._watchers if w.job_id is not None))

    async def watch(
        self, job_id: str | None, request: Callable[[], CycleRequest] | None = None
    ) -> AsyncIterator[PollUpdate]:
        """Updates for one job (or none) and its file requests, one per poll cycle, until the caller stops.

        `request` is asked before every cycle what to read, stat, probe or write; its answers come
        back in the same update, in the same order.
        """
        watcher = _Watcher(None if job_id is None else str(job_id), request, asyncio.Queue())
        self._watchers.append(watcher)
        self._due = min(self._due, time.monotonic() + self.first_check_after)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"oellm-poller-{self.key}")
        try:
            while True:
                yield await watcher.queue.get()
        finally:
            self._watchers.remove(watcher)
            self._wake.set()

    def soon(self) -> None:
        """A watcher needs its next cycle now (its restored state read, or a stop that waits for the state
        saying so): the next cycle runs at once, for every watcher of this poller (after SOON_AFTER, so that
        watchers restored together share it)."""
        self._due = min(self._due, time.monotonic() + SOON_AFTER)
        self._wake.set()

    async def _sleep_until_due(self) -> None:
        while self._watchers:
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
            while self._watchers:
                await self._sleep_until_due()
                if not self._watchers:
                    break
                await self._cycle(list(self._watchers))
        finally:
            hook, self.hook = self.hook, None
            if hook is not None:
                await hook.close()
            for registry_key, poller in list(self._registry.items()):
                if poller is self and not self._watchers:
                    del self._registry[registry_key]

    async def _cycle(self, watchers: list[_Watcher]) -> None:
        self.cycles += 1
        if self.hook is None:
            self.hook = self.hook_factory()
        requests = [w.request() if w.request else CycleRequest() for w in watchers]
        combined = CycleRequest(
            reads=[r for q in requests for r in q.reads],
            stats=list(dict.fromkeys(p for q in requests for p in q.stats)),
            checkpoints=[c for q in requests for c in q.checkpoints],
            writes=[w for q in requests for w in q.writes],
        )
        ids = list(dict.fromkeys(w.job_id for w in watchers if w.job_id is not None))
        start_of = self.start_estimates.due(ids, time.time())
        try:
            result = await self.hook.poll_cycle(ids, combined, start_of=start_of)
        except SlurmCommandError as exc:
            self.failed_cycles += 1
            self.consecutive_failures += 1
            self.failing_since = self.failing_since or time.time()
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
                for w in watchers:
                    update = PollUpdate.failed(
                        w.job_id, exc, self.cycles, self.consecutive_failures, self.failing_since
                    )
                    w.queue.put_nowait(update)
            return
        self.consecutive_failures, self.failing_since = 0, None
        self._due = time.monotonic() + self.interval
        statuses = self.start_estimates.estimated(result.statuses, start_of, result.start_estimates, time.time())
        mtimes = dict(zip(combined.stats, result.mtimes, strict=True))
        reads = checks = writes = 0
        for w, q in zip(watchers, requests, strict=True):
            update = PollUpdate(
                w.job_id,
                statuses.get(w.job_id) if w.job_id is not None else None,
                self.cycles,
                chunks=tuple(result.chunks[reads : reads + len(q.reads)]),
                mtimes={p: mtimes[p] for p in q.stats},
                checkpoints=tuple(result.checkpoints[checks : checks + len(q.checkpoints)]),
                writes_ok=tuple(result.writes_ok[writes : writes + len(q.writes)]),
                superseded=any(result.writes_stale[writes : writes + len(q.writes)]),
            )
            reads, checks, writes = reads + len(q.reads), checks + len(q.checkpoints), writes + len(q.writes)
            w.queue.put_nowait(update)
