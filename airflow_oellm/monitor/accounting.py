"""GPU-hours used, each figure under its own name.

- `attempt_used_gpu_hours`: what one attempt's job used (sacct's start to end, times its GPUs);
  stored with the attempt (`AttemptRecord.gpu_hours`).
- `used_gpu_hours`: the sum over attempts; `used_gpu_hours_by_kind`: a run's, by kind of job (the
  report's "GPU-hours used" line).
- `running_gpu_hours_estimate`: a job still running, so far (the dashboard adds it to what ended).

Planned figures (one submission at its time limit, a whole run) are the budget's: config/budget.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from airflow_oellm.monitor.records import AttemptHistory


def attempt_used_gpu_hours(start: str | None, end: str | None, gpus: int | None) -> float | None:
    """Hours between sacct's start and end times the job's GPUs; None when any is unknown."""
    if gpus is None or not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None
    return round(max(seconds, 0) / 3600 * gpus, 4)


def used_gpu_hours(figures: Iterable[float | None]) -> float:
    """What attempts used, from their `gpu_hours` (an attempt without a figure counts nothing)."""
    return sum(f for f in figures if isinstance(f, int | float) and not isinstance(f, bool))


def used_gpu_hours_by_kind(results: Mapping[str, Sequence[Mapping[str, Any] | None]]) -> dict[str, float]:
    """Kind of job -> GPU-hours its tasks' attempts used (from each task's result), and the total."""
    used = {
        kind: round(sum(used_gpu_hours(a.gpu_hours for a in AttemptHistory.of_result(r).attempts) for r in found), 3)
        for kind, found in results.items()
    }
    return {**used, "total": round(sum(used.values()), 3)}


def running_gpu_hours_estimate(running_since: float, now: float, gpus: float) -> float:
    """A running job's GPU-hours so far, from when it was first seen running."""
    return max(now - running_since, 0.0) / 3600 * gpus
