"""Who hears of what: a sweep's alerts (`notifications.notify`), and `platform.on_outage.callback`.

Alerts tell what happened to a sweep's experiments, briefly, with a link. Each notifier hears the events it
lists (all by default). A webhook gets a JSON POST whose `text` Slack, Mattermost and Teams incoming webhooks
show as it is; an Airflow notifier (`BaseNotifier`, any provider's) or a function is called with a context
holding `message` and `alert`. A notifier's failure is logged, never the task's: an alert must not fail a
training.

The outage callback, a lab's own function or Airflow notifier, is told once per outage; so is each sweep's
`outage` alert.

A notifier (`BaseNotifier`) is called with the notice as its context, on a copy: it renders its
template fields in place, and a module-level instance would otherwise repeat its first message.

Every job a triggerer follows on a cluster sees the same outage (one poller per cluster), so the first
of them to report it calls the callback and the others do not: the key is (callback, cluster, outage
start, event). Two triggerers each call it once.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# the notices told, oldest first: a triggerer runs for months, so only the latest are remembered (an
# outage's notices come within its duration, long before a thousand others)
TOLD_REMEMBERED = 1000
_told: dict[tuple[str, str, float, str], None] = {}


def notifier_callable(path: str, setting: str = "platform.on_outage.callback") -> Callable[..., Any]:
    """The function, notifier class or instance at `path`; ImportError naming `setting` and why if none."""
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImportError(f"{setting}: cannot import {path}: {exc}") from None
    if not callable(found):
        raise ImportError(f"{setting}: {path} is a {type(found).__name__}, not a callable")
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
        callback = notifier_callable(path)
        if hasattr(callback, "render_template_fields"):  # a notifier renders its templates in place: a copy
            callback = copy.deepcopy(callback)
        callback(notice)
    except Exception as exc:
        log.warning("platform.on_outage.callback %s failed on %s: %s", path, notice.get("event"), exc)
    else:
        log.info("told %s: %s", path, notice.get("message"))


# ---------------------------------------------------------------- alerts

EVENTS = (
    "training_fatal",  # a training failed for good: not retried
    "retries_exhausted",  # a retryable failure on its last try
    "stalled",  # no progress: a hang the watch cancelled
    "early_stop",  # the sweep's rung stopped a point
    "sweep_finished",  # the sweep DAG's summary, with its table
    "outage",  # the cluster cannot be reached (after platform.on_outage.after), is again, or a watch gave up
    "budget_reached",  # a run refused: its plan is over a GPU-hour budget
)
LABELS = {
    "training_fatal": "training failed",
    "retries_exhausted": "retries exhausted",
    "stalled": "stalled",
    "early_stop": "stopped early",
    "sweep_finished": "sweep finished",
    "outage": "cluster access",
    "budget_reached": "over budget",
}
WEBHOOK_TIMEOUT = 10.0  # seconds: a slow receiver must not hold a worker
MAX_REASON = 300  # characters of the reason in a message: the link has the rest


@dataclass(frozen=True)
class Alert:
    event: str
    sweep: str
    experiment: str | None  # None: the whole sweep
    reason: str
    link: str | None = None  # the dashboard's page of it
    table: str | None = None  # a Markdown table after the line (the sweep's summary)

    @property
    def message(self) -> str:
        """`[oellm] dash1/lr0.01: training failed: job 12 FAILED: CUDA error ... <link>`, one line."""
        where = f"{self.sweep}/{self.experiment}" if self.experiment else self.sweep
        reason = self.reason if len(self.reason) <= MAX_REASON else self.reason[: MAX_REASON - 1] + "…"
        text = f"[oellm] {where}: {LABELS.get(self.event, self.event)}: {reason}"
        text = f"{text} {self.link}" if self.link else text
        return f"{text}\n```\n{self.table.strip()}\n```" if self.table else text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def hears(notify: Sequence[Mapping[str, Any]], event: str) -> bool:
    """Whether a notifier of `notify` (the config's `notifications.notify`) listens to `event`."""
    return any(event in (notifier.get("events") or EVENTS) for notifier in notify)


def post_webhook(url: str, alert: Alert) -> None:
    body = json.dumps({"text": alert.message, "alert": alert.to_dict()}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
        response.read()


def deliver(
    alert: Alert,
    notify: Sequence[Mapping[str, Any]],
    log: logging.Logger,
    resolve: Callable[[str], str] = lambda reference: reference,
) -> int:
    """Tell every notifier of `notify` (the config's `notifications.notify`) that lists the alert's event;
    `resolve` turns a webhook's `var:`/`conn:` reference into its URL. Returns how many were told."""
    told = 0
    for index, notifier in enumerate(notify):
        if alert.event not in (notifier.get("events") or EVENTS):
            continue
        what = notifier.get("notifier") or f"notify[{index}] webhook"
        try:
            if notifier.get("webhook"):
                post_webhook(resolve(str(notifier["webhook"])), alert)
            else:
                found = notifier_callable(str(notifier["notifier"]), "notifications.notify")
                args = dict(notifier.get("args") or {})
                # a class is made with its args; an instance renders its templates in place: a copy
                target = found(**args) if isinstance(found, type) else copy.deepcopy(found)
                target({"message": alert.message, "alert": alert.to_dict()})
        except Exception as exc:  # an alert never fails the task that sends it
            log.warning("notifications: %s failed on %s: %s", what, alert.event, exc)
        else:
            told += 1
            log.info("told %s: %s", what, alert.message)
    return told
