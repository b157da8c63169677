"""Why a pending job waits, and until when: SLURM's reason code (squeue `%r`) as a category, whether it can
clear by itself, what to change when it cannot; and the schedule of start estimates (`squeue --start`).

The reasons are SLURM's own (`job_reason_string`, slurm_protocol_defs.c, 22.05 to 24.11), matched by a
declarative rule table, first match wins. A reason no rule knows is `other`, and may clear.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from airflow_oellm.slurm.states import JobState, JobStatus

DEFAULT_START_ESTIMATE_INTERVAL = 600.0  # seconds between two `squeue --start` of one cluster

# what each category is called where people read it
CATEGORY_LABELS = {
    "priority": "priority",
    "resources": "resources",
    "limits": "QOS/association limit",
    "budget": "allocation used up",
    "too_big": "over a per-job limit",
    "dependency": "dependency",
    "held": "held",
    "reservation": "reservation",
    "begin_time": "start time not reached",
    "partition": "partition unavailable",
    "not_allowed": "account or QOS not allowed",
    "scheduling": "not yet scheduled",
    "other": "other",
}

OUTSIDE_LIMITS = (
    "the job's size or time is outside what its QOS, association or partition allows one job: change "
    "slurm.time, slurm.nodes or slurm.gpus_per_node, or choose a slurm.qos or slurm.partition that allows it"
)


@dataclass(frozen=True)
class PendingRule:
    """Reasons matching `pattern` (the whole code) are `category`; `clears`: the job can start as it is."""

    pattern: str
    category: str
    clears: bool = True
    fix: str | None = None

    def matches(self, code: str) -> bool:
        return re.fullmatch(self.pattern, code) is not None


RULES: tuple[PendingRule, ...] = (
    PendingRule(r"None|", "scheduling"),
    PendingRule(r"Priority|PriorityJobArrayLimit", "priority"),
    PendingRule(r"Dependency", "dependency"),
    PendingRule(
        r"DependencyNeverSatisfied",
        "dependency",
        False,
        "a job it depends on failed or was cancelled: cancel this one (the task's retry submits anew)",
    ),
    PendingRule(r"BeginTime", "begin_time"),
    PendingRule(
        r"JobHeldUser",
        "held",
        False,
        "held by its user: `scontrol release <job id>` lets it start",
    ),
    PendingRule(
        r"JobHeldAdmin",
        "held",
        False,
        "held by an administrator: ask the site's support to release it",
    ),
    PendingRule(
        r"JobHoldMaxRequeue|launch_failed_requeued_held|launch failed requeued held",
        "held",
        False,
        "held after failed launches (often a bad node): look at its log, then `scontrol release <job id>`",
    ),
    PendingRule(r"Reservation|ReqNodeNotAvail.*Reserved_for_maintenance.*", "reservation"),
    PendingRule(
        r"Resources|Nodes_required_for_job.*|ReqNodeNotAvail.*|NodeDown|Licenses|BurstBuffer\w*|Cleaning|Prolog"
        r"|Power(NotAvail|Reserved)|FrontEndDown",
        "resources",
    ),
    PendingRule(r"PartitionDown|PartitionInactive", "partition"),
    PendingRule(r"PartitionTimeLimit|PartitionNodeLimit|Partition\w*Limit", "too_big", False, OUTSIDE_LIMITS),
    PendingRule(
        r"PartitionConfig|BadConstraints",
        "too_big",
        False,
        "no node of the partition can ever run it as asked: check slurm.constraint, slurm.gpus_per_node, "
        "slurm.cpus_per_task and slurm.mem against the partition's nodes",
    ),
    PendingRule(
        r"InvalidAccount|InvalidQOS|QOSNotAllowed|AccountNotAllowed",
        "not_allowed",
        False,
        "set slurm.account and slurm.qos to ones you may use (`sacctmgr show assoc user=$USER`)",
    ),
    # the account's or QOS's budget of CPU/GPU/billing minutes is spent: running jobs' minutes (RunMinutes)
    # come back as they end, used ones do not
    PendingRule(
        r"(QOS|Assoc)Grp(?!\w*Run)\w*(Minutes|Mins)(Limit)?",
        "budget",
        False,
        "the account's allocation of this resource is used up: ask the project's PI or the site for more, or "
        "charge another slurm.account",
    ),
    PendingRule(
        r"(QOS|Assoc)Max\w*Per(Job|Node)(Limit)?|QOSMin\w*|AssocMax\w*MinutesPerJob", "too_big", False, OUTSIDE_LIMITS
    ),
    PendingRule(r"(QOS|Assoc|Association)\w*", "limits"),  # per user, per group, jobs at a time: others end
    PendingRule(r"JobArrayTaskLimit", "limits"),
)


@dataclass(frozen=True)
class QueueState:
    """A pending job's place in the queue, as the dashboard and the task log show it."""

    reason: str  # SLURM's own text
    category: str
    clears: bool = True
    fix: str | None = None
    expected_start: float | None = None  # epoch seconds (`squeue --start`), None until estimated

    @property
    def label(self) -> str:
        return CATEGORY_LABELS.get(self.category, self.category)

    def describe(self) -> str:
        """`pending: Priority (priority)`, and for a reason that never clears, that it will not start."""
        text = f"pending: {self.reason or 'not yet scheduled'} ({self.label})"
        if not self.clears:
            text += f"; it will not start as submitted: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def queue_state(reason: str | None, expected_start: float | None = None) -> QueueState:
    """The category of SLURM's pending reason (`%r`: a code, sometimes with detail after a comma)."""
    text = (reason or "").strip()
    code = text.split(",", 1)[0].strip()
    for rule in RULES:
        if rule.matches(code) or rule.matches(text):
            return QueueState(text, rule.category, rule.clears, rule.fix, expected_start)
    return QueueState(text, "other", True, None, expected_start)


def pending_counts(states: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    """How many jobs wait for each reason (the `queue` of progress snapshots), most first."""
    counts: dict[str, int] = {}
    for state in states:
        if state:
            key = str(state.get("reason") or "not yet scheduled")
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class StartEstimates:
    """When to ask SLURM for the pending jobs' expected starts (`squeue --start`): for all of a cluster's
    pending jobs in one command, at most once per `interval` seconds, never while none is pending (0: never).
    Between two asks, each job keeps its last estimate."""

    interval: float = DEFAULT_START_ESTIMATE_INTERVAL
    asked_at: float | None = None
    estimates: dict[str, float | None] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)  # the jobs the last cycle saw pending

    def due(self, job_ids: Iterable[str], now: float) -> list[str]:
        """Of the jobs polled next, those to ask about now: every one that pended at the last cycle, once the
        interval has passed; else none."""
        ids = [j for j in dict.fromkeys(job_ids) if j in self.pending]
        if not ids or self.interval <= 0 or not math.isfinite(self.interval):
            return []
        if self.asked_at is not None and now - self.asked_at < self.interval:
            return []
        return ids

    def record(self, asked: Iterable[str], answers: Mapping[str, float | None] | None, now: float) -> None:
        """What an ask returned (a job it did not list has left the queue). A failed ask (None) keeps the
        estimates as they were, and is not repeated before the interval has passed."""
        self.asked_at = now
        if answers is not None:
            for job_id in asked:
                self.estimates[job_id] = answers.get(job_id)

    def estimated(
        self,
        statuses: Mapping[str, JobStatus],
        asked: Iterable[str] = (),
        answers: Mapping[str, float | None] | None = None,
        now: float = 0.0,
    ) -> dict[str, JobStatus]:
        """A cycle's statuses, each pending one with its latest estimate (after recording the cycle's ask)."""
        asked = list(asked)
        if asked:
            self.record(asked, answers, now)
        self.pending = pending = {j for j, s in statuses.items() if s.state is JobState.PENDING}
        self.estimates = {j: e for j, e in self.estimates.items() if j in pending}
        return {j: replace(s, expected_start=self.estimates.get(j)) if j in pending else s for j, s in statuses.items()}
