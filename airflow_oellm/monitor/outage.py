"""Cluster outages as a waiting task sees them: since when, of which kind, and what a person can do.

A poll that fails is no job state: the job may train on through a login node's maintenance day or an
expired SSH certificate. A follower keeps waiting for `platform.max_outage` (days by default) and says
so meanwhile, in words that tell an authentication failure (renew the certificate or key) from a network
one (wait, or check the site's status page).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_oellm.slurm.timespec import time_limit_seconds

DEFAULT_MAX_OUTAGE = "3-00:00:00"  # a maintenance day and a weekend's expired certificate

AUTHENTICATION = "authentication"
HOST_KEY = "host key"
NETWORK = "network"
SCHEDULER = "scheduler"
OTHER = "other"

# the first matching kind wins: a host key problem also reads as a failed connection
_KINDS = (
    (HOST_KEY, re.compile(r"host key|not trusted|HostKeyNotVerifiable|REMOTE HOST IDENTIFICATION", re.IGNORECASE)),
    (
        AUTHENTICATION,
        re.compile(
            r"permission denied|authentication|auth fail|publickey|certificate|PermissionDenied|no (valid )?keys",
            re.IGNORECASE,
        ),
    ),
    (
        SCHEDULER,
        re.compile(
            r"slurm_load_jobs|slurm controller|Socket timed out|slurmdbd|Problem talking to the database"
            r"|backup controller|squeue: error|sacct: error",
            re.IGNORECASE,
        ),
    ),
    (
        NETWORK,
        re.compile(
            r"connect|connection|timed out|timeout|unreachable|no route|name or service|resolve|reset by peer"
            r"|broken pipe|closed|EOF|network|SSH failure",
            re.IGNORECASE,
        ),
    ),
)
# a remote command that ran and failed (slurm/commands.command_error): its session was authenticated, so
# "Permission denied" there is a file's, never the login's
_REMOTE_COMMAND_FAILED = re.compile(r"^\S+ failed \(exit -?\d+\): ")
_CONNECTION_KINDS = (AUTHENTICATION, HOST_KEY)
WHAT = {
    AUTHENTICATION: "authentication failed",
    HOST_KEY: "the login node's host key is not the one trusted",
    NETWORK: "the login node cannot be reached",
    SCHEDULER: "SLURM does not answer",
    OTHER: "commands fail",
}
ADVICE = {
    AUTHENTICATION: "renew your SSH certificate or key for this connection; the task carries on once it works",
    HOST_KEY: "check the new key with the site, then update the connection's host_key or known_hosts",
    NETWORK: "a maintenance or a network problem; the task waits and carries on by itself",
    SCHEDULER: "the controller is busy or down; the task waits and carries on by itself",
    OTHER: "see the error; the task waits and carries on once commands work",
}


def outage_kind(error: str) -> str:
    ran = bool(_REMOTE_COMMAND_FAILED.match(error))
    for kind, pattern in _KINDS:
        if ran and kind in _CONNECTION_KINDS:
            continue
        if pattern.search(error):
            return kind
    return OTHER


def max_outage_seconds(value: int | str) -> float | None:
    """`platform.max_outage` (seconds or a SLURM time string) in seconds; None: wait for ever (UNLIMITED)."""
    seconds = time_limit_seconds(value)
    return None if seconds is None else float(seconds)


DEFAULT_MAX_OUTAGE_SECONDS = max_outage_seconds(DEFAULT_MAX_OUTAGE)


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min" if minutes else f"{int(seconds)} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours // 24} days {hours % 24} h"


@dataclass(frozen=True)
class Outage:
    """Polls of the cluster `cluster_name` have failed since `since` (epoch seconds); `error` is the latest."""

    cluster_name: str
    since: float
    error: str
    failures: int = 1

    @property
    def kind(self) -> str:
        return outage_kind(self.error)

    def message(self, now: float) -> str:
        return (
            f"cannot reach {self.cluster_name} since {_clock(self.since)} ({_duration(now - self.since)}): "
            f"{WHAT[self.kind]} ({ADVICE[self.kind]}). Last error: {self.error}"
        )

    def ended(self, now: float) -> str:
        return f"reached {self.cluster_name} again after {_duration(now - self.since)} without contact"

    def to_dict(self, now: float) -> dict[str, Any]:
        """For the progress XCom and the dashboard."""
        return {
            "cluster": self.cluster_name,
            "since": self.since,
            "kind": self.kind,
            "what": WHAT[self.kind],
            "advice": ADVICE[self.kind],
            "error": self.error[:500],
            "failures": self.failures,
            "seconds": round(now - self.since, 1),
        }


def outage_line(outage: Mapping[str, Any]) -> str:
    """A progress snapshot's outage in one line: `cannot reach lumi since 2026-12-06 02:13 UTC: authentication
    failed` (the dashboard's row)."""
    since = outage.get("since")
    when = _clock(float(since)) if isinstance(since, int | float) else "?"
    return f"cannot reach {outage.get('cluster', 'the cluster')} since {when}: {outage.get('what', 'commands fail')}"


def outage_notice(event: str, outage: Outage, now: float) -> dict[str, Any]:
    """What `platform.on_outage.callback` gets: `event`, a one-paragraph `message`, the `outage` itself."""
    text = {
        "started": outage.message(now),
        "ended": outage.ended(now),
        "gave_up": f"{outage.message(now)}; a task stopped waiting (platform.max_outage)",
    }[event]
    return {"event": event, "message": text, "outage": outage.to_dict(now)}
