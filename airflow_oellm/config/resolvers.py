"""OmegaConf resolvers the configs may use, and the per-run frozen clock behind `timestring`.

- `${platform_detect:}`      detected platform name, `base` when unknown
- `${timestring:[fmt]}`      run time, frozen once per experiment run (also `oc.timestring`)
- `${slurmtime:seconds}`     seconds as a SLURM time limit (`7200` -> `02:00:00`)
- `${pad_iter:n}`            Megatron iteration directory name (`1000` -> `iter_0001000`)
- `${eval:'expr'}`           safe arithmetic (also `oc.eval`), see expressions.py
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from omegaconf import OmegaConf

from airflow_oellm.config.expressions import Expression
from airflow_oellm.slurm.timespec import format_slurm_time

DEFAULT_TIME_FORMAT = "%Y%m%d-%H%M%S"

_run_time: ContextVar[dt.datetime | None] = ContextVar("oellm_run_time", default=None)


@contextlib.contextmanager
def frozen_time(when: dt.datetime | None = None) -> Iterator[dt.datetime]:
    """Every `${timestring:}` resolved inside gives this instant (default: now, UTC).

    Nested use keeps the outer instant, so one resolution never sees two different times.
    """
    current = _run_time.get()
    if current is not None and when is None:
        yield current
        return
    instant = when or dt.datetime.now(dt.UTC)
    token = _run_time.set(instant)
    try:
        yield instant
    finally:
        _run_time.reset(token)


def _timestring(fmt: str = DEFAULT_TIME_FORMAT) -> str:
    instant = _run_time.get()
    if instant is None:
        raise ValueError("timestring used outside a frozen run time (internal error)")
    return instant.strftime(fmt)


def _slurmtime(seconds: Any) -> str:
    return format_slurm_time(float(seconds))


def _pad_iter(iteration: Any) -> str:
    value = int(iteration)
    if value < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration!r}")
    return f"iter_{value:07d}"


def _eval(expression: Any) -> Any:
    if not isinstance(expression, str):
        return expression
    return Expression(expression).evaluate({})


def _platform_detect() -> str:
    from airflow_oellm.config.platforms import detect_platform

    found = detect_platform()
    return found.name if found.name != "unknown" else "base"


RESOLVERS = {
    "platform_detect": _platform_detect,
    "timestring": _timestring,
    "oc.timestring": _timestring,
    "slurmtime": _slurmtime,
    "pad_iter": _pad_iter,
    "eval": _eval,
    "oc.eval": _eval,
}


def register_resolvers() -> None:
    """Idempotent; called on import of the config package."""
    for name, fn in RESOLVERS.items():
        OmegaConf.register_resolver(name, fn, replace=True, annotation_validation="off")
