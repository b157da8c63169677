"""SLURM time limits: parse `--time` strings to seconds and format seconds back."""

from __future__ import annotations

import re

UNLIMITED = frozenset({"UNLIMITED", "INFINITE", "infinite", "unlimited"})

_TIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # days-hours[:minutes[:seconds]]
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"  # minutes | minutes:seconds | hours:minutes:seconds
)


def parse_slurm_time(text: str) -> int | None:
    """Seconds in a SLURM time string; None for UNLIMITED. Raises ValueError when malformed."""
    text = text.strip()
    if text in UNLIMITED:
        return None
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"invalid SLURM time {text!r}; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    g = m.groupdict()
    if g["days"] is not None:
        return int(g["days"]) * 86400 + int(g["dh"]) * 3600 + int(g["dm"] or 0) * 60 + int(g["ds"] or 0)
    a, b, c = g["a"], g["b"], g["c"]
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def format_slurm_time(seconds: int | float) -> str:
    """`HH:MM:SS`, or `D-HH:MM:SS` from one day up. Seconds are rounded up (a limit never shrinks)."""
    total = int(-(-float(seconds) // 1))
    if total <= 0:
        raise ValueError(f"time limit must be positive, got {seconds!r} seconds")
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def time_limit_seconds(value: int | str) -> int | None:
    """A config time limit (seconds or SLURM string) in seconds; None for UNLIMITED."""
    if isinstance(value, bool):
        raise ValueError(f"invalid time limit {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"time limit must be positive, got {value} seconds")
        return value
    return parse_slurm_time(value)
