"""`platform.on_outage.callback`: a lab's own function or Airflow notifier, told once per outage.

A notifier (`BaseNotifier`) is called with the notice as its context, on a copy: it renders its
template fields in place, and a module-level instance would otherwise repeat its first message.

Every job a triggerer follows on a cluster sees the same outage (one poller per cluster), so the first
of them to report it calls the callback and the others do not: the key is (callback, cluster, outage
start, event). Two triggerers each call it once.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

# the notices told, oldest first: a triggerer runs for months, so only the latest are remembered (an
# outage's notices come within its duration, long before a thousand others)
TOLD_REMEMBERED = 1000
_told: dict[tuple[str, str, float, str], None] = {}


def outage_callback(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """The callable at `path`; ImportError (with the reason) if there is none."""
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImportError(f"platform.on_outage.callback: cannot import {path}: {exc}") from None
    if not callable(found):
        raise ImportError(f"platform.on_outage.callback: {path} is a {type(found).__name__}, not a callable")
    return found


def first_to_tell(path: str, cluster_key: str, notice: Mapping[str, Any]) -> bool:
    """Whether this notice is the first of its outage and event in this process (then it is told)."""
    key = (path, cluster_key, float(notice["outage"]["since"]), str(notice["event"]))
    if key in _told:
        return False
    _told[key] = None
    while len(_told) > TOLD_REMEMBERED:
        del _told[next(iter(_told))]
    return True


def tell(path: str, notice: Mapping[str, Any], log: logging.Logger) -> None:
    """Call the callback; its failure is logged, never the watch's."""
    try:
        callback = outage_callback(path)
        if hasattr(callback, "render_template_fields"):  # a notifier renders its templates in place: a copy
            callback = copy.deepcopy(callback)
        callback(notice)
    except Exception as exc:
        log.warning("platform.on_outage.callback %s failed on %s: %s", path, notice.get("event"), exc)
    else:
        log.info("told %s: %s", path, notice.get("message"))
