"""Sending a sweep's alerts from a task or a trigger (notifications.py holds what they say and how they are
delivered): the webhook URLs' secret references looked up and masked, and the dashboard link of what the alert
is about."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

from airflow.configuration import conf
from airflow.sdk import Connection, Variable
from airflow.sdk.log import mask_secret

from airflow_oellm.config.naming import DASHBOARD_PATH
from airflow_oellm.config.schema import NotificationsConfig
from airflow_oellm.config.secrets import resolve_secrets
from airflow_oellm.notifications import Alert, deliver, hears


def dashboard_link(
    notifications: Mapping[str, Any], *, dag_id: str | None = None, run_id: str | None = None, sweep: str | None = None
) -> str | None:
    """The dashboard's page of an experiment run (or of a sweep), under `dashboard_url` or Airflow's base URL."""
    base = notifications.get("dashboard_url") or (
        f"{conf.get('api', 'base_url', fallback='').rstrip('/')}{DASHBOARD_PATH}"
        if conf.get("api", "base_url", fallback="")
        else None
    )
    if not base:
        return None
    base = base.rstrip("/")
    if dag_id:
        page = f"{base}/experiments/{quote(dag_id, safe='')}"
        return f"{page}?run_id={quote(run_id, safe='')}" if run_id else page
    return f"{base}/sweeps/{quote(sweep, safe='')}" if sweep else base


def webhook_url(reference: str) -> str:
    """A webhook's URL: as written, or looked up from its secret reference (and masked in this process's logs)."""
    if reference.startswith(("https://", "http://")):
        return reference
    url = resolve_secrets({"WEBHOOK": reference}, Variable.get, Connection.get)["WEBHOOK"]
    mask_secret(url)
    return url


def send_alert(notifications: Mapping[str, Any] | None, alert: Alert, log: logging.Logger) -> int:
    """Tell the config's notifiers (`NotificationsConfig` as a dict) of the alert; how many were told."""
    notify = (notifications or {}).get("notify") or []
    return deliver(alert, notify, log, resolve=webhook_url) if notify else 0


@dataclass(frozen=True)
class OutageAlerts:
    """What a watch needs to tell a sweep's notifiers of an outage: it serializes with the trigger."""

    sweep: str
    notifications: dict[str, Any]  # NotificationsConfig as a dict
    link: str | None  # the sweep's dashboard page

    @classmethod
    def of(cls, notifications: NotificationsConfig, sweep: str) -> OutageAlerts | None:
        """None when no notifier hears of outages."""
        settings = asdict(notifications)
        if not hears(settings["notify"], "outage"):
            return None
        return cls(sweep, settings, dashboard_link(settings, sweep=sweep))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutageAlerts:
        return cls(str(data["sweep"]), dict(data["notifications"]), data.get("link"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """Who is told, for `first_to_tell`: every job of a sweep on a cluster sees the same outage."""
        return f"notifications.notify of sweep {self.sweep}"

    def send(self, notice: Mapping[str, Any], log: logging.Logger) -> int:
        """Tell them of an outage notice (`monitor/outage.outage_notice`)."""
        return send_alert(self.notifications, Alert("outage", self.sweep, None, str(notice["message"]), self.link), log)
