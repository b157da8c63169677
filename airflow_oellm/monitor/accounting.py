"""GPU-hours, each figure under its own name.

- `attempt_used_gpu_hours`: what one attempt's job used (sacct's start to end, times its GPUs);
  stored with the attempt (`AttemptRecord.gpu_hours`).
- Planned figures (an attempt at its time limit, a whole run) are the budget's: config/budget.py.
"""

from __future__ import annotations

from datetime import datetime


def attempt_used_gpu_hours(start: str | None, end: str | None, gpus: int | None) -> float | None:
    """Hours between sacct's start and end times the job's GPUs; None when any is unknown."""
    if gpus is None or not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None
    return round(max(seconds, 0) / 3600 * gpus, 4)
