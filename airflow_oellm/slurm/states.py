"""SLURM job states as a type: what is still active, what is final, and what counts as success.

Every state SLURM reports maps to a member; anything new or garbled becomes UNKNOWN, which is
neither active-and-fine nor final, so a watcher keeps polling and reports it instead of
guessing. NOT_FOUND (the job is in neither squeue nor sacct) is its own state, never success.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class JobState(enum.Enum):
    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    STOPPED = "STOPPED"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    RESIZING = "RESIZING"
    REQUEUED = "REQUEUED"
    REQUEUE_FED = "REQUEUE_FED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    REVOKED = "REVOKED"
    NOT_FOUND = "NOT_FOUND"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """The job will not run again by itself (REQUEUED and the holds will)."""
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """Queued, held, running or finishing: it may still use the output directory."""
        return self in _ACTIVE

    @property
    def is_success(self) -> bool:
        return self is JobState.COMPLETED

    @classmethod
    def parse(cls, text: str) -> JobState:
        """`RUNNING`, `CANCELLED by 1001`, `CANCELLED+`, `OUT_OF_ME+` (fixed width), lower case ..."""
        word = text.strip().split(" ", 1)[0].rstrip("+").upper()
        if not word:
            return cls.UNKNOWN
        try:
            return cls(word)
        except ValueError:
            pass
        # fixed-width sacct cuts names with '+': accept an unambiguous prefix
        matches = [s for s in cls if s.value.startswith(word) and s not in (cls.NOT_FOUND, cls.UNKNOWN)]
        return matches[0] if len(matches) == 1 else cls.UNKNOWN


_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.OUT_OF_MEMORY,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
        JobState.REVOKED,
        JobState.SPECIAL_EXIT,
        JobState.NOT_FOUND,
    }
)
_ACTIVE = frozenset(
    {
        JobState.PENDING,
        JobState.CONFIGURING,
        JobState.RUNNING,
        JobState.COMPLETING,
        JobState.SUSPENDED,
        JobState.STOPPED,
        JobState.SIGNALING,
        JobState.STAGE_OUT,
        JobState.RESIZING,
        JobState.REQUEUED,
        JobState.REQUEUE_FED,
        JobState.REQUEUE_HOLD,
        JobState.RESV_DEL_HOLD,
    }
)


@dataclass(frozen=True)
class JobStatus:
    """One job as SLURM reports it. `job_id` is the raw id (unique also for array elements)."""

    job_id: str
    state: JobState
    raw_state: str = ""
    display_id: str = ""  # `A_T` for array elements, else the job id
    array_job_id: str | None = None
    array_task_id: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    cancelled_by: str | None = None
    nodes: str | None = None
    name: str | None = None
    comment: str | None = None
    start: str | None = None
    end: str | None = None
    restarts: int = 0
    source: str = ""  # "squeue" | "sacct" | "" (not found)
    history: tuple[str, ...] = field(default_factory=tuple)  # earlier runs' states (requeues)
    expected_start: float | None = None  # a pending job's, epoch seconds (`squeue --start`; slurm/pending.py)

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @classmethod
    def not_found(cls, job_id: str) -> JobStatus:
        return cls(job_id=job_id, state=JobState.NOT_FOUND, display_id=job_id)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe form (for trigger events and XCom)."""
        return {
            "job_id": self.job_id,
            "state": self.state.value,
            "raw_state": self.raw_state,
            "display_id": self.display_id,
            "array_job_id": self.array_job_id,
            "array_task_id": self.array_task_id,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "exit_signal": self.exit_signal,
            "cancelled_by": self.cancelled_by,
            "nodes": self.nodes,
            "name": self.name,
            "comment": self.comment,
            "start": self.start,
            "end": self.end,
            "restarts": self.restarts,
            "source": self.source,
            "history": list(self.history),
            "expected_start": self.expected_start,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> JobStatus:
        values = dict(data)
        values["state"] = JobState(values["state"])
        values["history"] = tuple(values.get("history") or ())  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
