"""Hang detection: a RUNNING job whose log, iteration and watched output files all stand still."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Activity:
    """What was last seen, and when something last moved (seconds since the epoch)."""

    last_change: float
    log_size: int = 0
    iteration: int = 0
    mtimes: Mapping[str, float] = field(default_factory=dict)
    running_since: float | None = None

    def observe(
        self,
        now: float,
        *,
        running: bool,
        log_size: int | None = None,
        iteration: int | None = None,
        mtimes: Mapping[str, float] | None = None,
    ) -> Activity:
        """A new observation; only time spent RUNNING can count as idle."""
        moved = (
            (log_size is not None and log_size != self.log_size)
            or (iteration is not None and iteration > self.iteration)
            or any(mtimes.get(p) != self.mtimes.get(p) for p in (mtimes or {}))
        )
        started = self.running_since if running and self.running_since is not None else (now if running else None)
        return replace(
            self,
            last_change=now if moved or not running or self.running_since is None else self.last_change,
            log_size=self.log_size if log_size is None else log_size,
            iteration=max(self.iteration, iteration or 0),
            mtimes={**self.mtimes, **(mtimes or {})},
            running_since=started,
        )

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.running_since is None else max(0.0, now - self.last_change)

    def is_hung(self, now: float, threshold: float) -> bool:
        return self.running_since is not None and self.idle_seconds(now) >= threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_change": self.last_change,
            "log_size": self.log_size,
            "iteration": self.iteration,
            "mtimes": dict(self.mtimes),
            "running_since": self.running_since,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, now: float) -> Activity:
        if not data:
            return cls(last_change=now)
        return cls(
            float(data["last_change"]),
            int(data.get("log_size", 0)),
            int(data.get("iteration", 0)),
            dict(data.get("mtimes") or {}),
            data.get("running_since"),
        )
