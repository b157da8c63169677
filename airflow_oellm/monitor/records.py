"""The records a training task leaves for the layers that read it, and the keys it stores them under.

Each record is written in one place and read through its class everywhere: the attempt history in
Airflow's task state store (the submit operator writes it; the progress guard, the report and the
dashboard read it) and the training status file on the cluster (the sensors beside the training
read it). Their JSON forms are wire formats: deployed databases and clusters hold values written by
earlier versions, so `from_dict` accepts what they lack and `to_dict` writes the same keys as ever.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, TypedDict

STATUS_READ_LIMIT = 64 * 1024  # bytes of a status file worth reading (it is a few hundred)


class TrainingState(StrEnum):
    """A training task's state as the sensors beside it see it (its status file)."""

    RUNNING = "running"
    RETRYING = "retrying"  # this try ended; Airflow will try again
    FAILED = "failed"  # for good: no try is coming
    COMPLETED = "completed"
    STOPPED = "stopped"  # by the sweep's early stopping; a user may clear it to train on

    @property
    def final(self) -> bool:
        return self in (TrainingState.FAILED, TrainingState.COMPLETED, TrainingState.STOPPED)


@dataclass(frozen=True)
class TrainingStatus:
    """`<output>/.oellm/status/<task>.json`: the last state of a training task of one DAG run."""

    state: TrainingState
    run_id: str
    try_number: int
    job_id: str | None
    log_path: str | None
    updated: float
    reason: str | None = None
    iteration: int | None = None  # the checkpoint when the attempt ended
    # the running job's loss went wrong from this iteration on (a spike or NaN not over yet): a checkpoint
    # saved since may be rewound away, so the branches beside the training wait (monitor/waiting.py)
    suspect_from: int | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "state": self.state.value,
            "run_id": self.run_id,
            "try": self.try_number,
            "job_id": self.job_id,
            "log_path": self.log_path,
            "updated": self.updated,
        }
        if self.reason is not None:
            data["reason"] = self.reason
        if self.iteration is not None:
            data["iteration"] = self.iteration
        if self.suspect_from is not None:
            data["suspect_from"] = self.suspect_from
        return json.dumps(data)

    @classmethod
    def from_json(cls, data: bytes | None, run_id: str | None) -> TrainingStatus | None:
        """The status of this DAG run (any run's with `run_id=None`), or None: absent, unreadable,
        another run's, or a state this version does not know (never final, as before)."""
        if not data:
            return None
        try:
            raw = json.loads(data.decode())
        except ValueError:
            return None
        if not isinstance(raw, dict) or (run_id is not None and raw.get("run_id") != run_id):
            return None
        try:
            state = TrainingState(raw.get("state"))
        except ValueError:
            return None
        return cls(
            state,
            str(raw.get("run_id") or ""),
            _int(raw.get("try")) or 0,
            raw.get("job_id"),
            raw.get("log_path"),
            _float(raw.get("updated")) or 0.0,
            raw.get("reason"),
            _int(raw.get("iteration")),
            _int(raw.get("suspect_from")),
        )


class ValidationPoint(TypedDict, total=False):
    iteration: int
    loss: float | None
    ppl: float | None
    split: str  # "validation" unless the log names another (test); a point without one is validation


class WatchSummary(TypedDict):
    """What the watch folds a job's log into (monitor/watch.summarize): in the trigger's finished event,
    the `result` XCom, each attempt's record (in part) and the `progress` XCom. Readers use `.get`:
    summaries written by older versions lack the later keys."""

    counts: dict[str, int]  # event name -> how often
    last_iteration: int | None
    first_iteration: int | None
    train_iters: int | None
    last_loss: float | None
    last_lr: float | None
    tokens_per_second_per_gpu: float | None
    iteration_ms: float | None
    consumed_samples: int | None
    global_batch_size: int | None
    running_since: float | None  # when the job was first seen running (the dashboard's estimate)
    checkpoints_saved: list[int]
    resumed_from: int | None
    validation: list[ValidationPoint]
    training_done: bool
    iterations_run: int
    faults: list[str]
    loss_curve: list[list[float]]  # [iteration, loss], thinned when long
    log_skipped_bytes: int
    nan_intervals: int  # consecutive iteration lines, up to the last, with a NaN or infinite loss
    anomalies: list[dict[str, Any]]  # anomaly events (monitor/anomalies.py): name and groups
    # the model's size as the log gave it (megatron/logs.logged_parameters): per model-parallel rank, and
    # Megatron's total in billions
    parameters_by_rank: dict[str, int]
    parameters_billions: float | None


# An attempt's keys as the submission writes them, then the ones its end adds (in that order).
SUBMISSION_KEYS = ("try", "job_id", "submission", "log_path", "checkpoint_before", "submitted_at", "gpus")
OUTCOME_KEYS = (
    "start",
    "end",
    "gpu_hours",
    "state",
    "raw_state",
    "exit_code",
    "verdict",
    "reason",
    "progress_free",
    "checkpoint_after",
    "last_iteration",
    "resumed_from",
    "loss_curve",
    "validation",
    "checkpoints_saved",
    "faults",
    "iteration_ms",
    "rewind",
    "nodes",
    "excluded_nodes",
)
# absent when the submission went unrecorded; `gpus` also in records written before it was kept
_OPTIONAL_SUBMISSION = ("submission", "log_path", "submitted_at", "gpus")


@dataclass(frozen=True)
class AttemptRecord:
    """One try of a task: its job, and once the job has ended, what it was and what it achieved."""

    try_number: int
    job_id: str | None
    checkpoint_before: int | None = None
    submission: str | None = None  # submitted | adopted (see slurm/operations.py)
    log_path: str | None = None
    submitted_at: float | None = None
    gpus: int | None = None  # what the job holds (its own resources: a conversion's are not the training's)
    start: str | None = None
    end: str | None = None
    gpu_hours: float | None = None  # this attempt's, from sacct's start and end
    state: str | None = None
    raw_state: str | None = None
    exit_code: int | None = None
    verdict: str | None = None  # None while the job runs
    reason: str | None = None
    progress_free: bool = False
    checkpoint_after: int | None = None
    last_iteration: int | None = None
    resumed_from: int | None = None
    loss_curve: list[Any] = field(default_factory=list)
    validation: list[Any] = field(default_factory=list)
    checkpoints_saved: list[Any] = field(default_factory=list)
    faults: list[Any] = field(default_factory=list)
    iteration_ms: float | None = None
    # the attempt was stopped to rewind its training: Divergence.to_dict() with `id`, `skipped` ([first, last]
    # iteration, or None) and `discarded` (the checkpoints moved aside; None until the rewind is done)
    rewind: dict[str, Any] | None = None
    nodes: str | None = None  # the SLURM node list its job ran on (`nid[001-004]`)
    excluded_nodes: list[str] = field(default_factory=list)  # what its end kept later tries off (why: `reason`)

    @property
    def ended(self) -> bool:
        return self.verdict is not None

    def to_dict(self) -> dict[str, Any]:
        data = {"try" if f.name == "try_number" else f.name: getattr(self, f.name) for f in fields(self)}
        keys = [k for k in SUBMISSION_KEYS if k not in _OPTIONAL_SUBMISSION or data[k] is not None]
        return {k: data[k] for k in [*keys, *(OUTCOME_KEYS if self.ended else ())]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttemptRecord:
        values = {k: v for k, v in data.items() if k in _ATTEMPT_FIELDS and v is not None}
        job_id = data.get("job_id")
        return cls(_int(data.get("try")) or 0, None if job_id is None else str(job_id), **values)


# read per attempt of every run on each dashboard page: computed once
_ATTEMPT_FIELDS = frozenset(f.name for f in fields(AttemptRecord)) - {"try_number", "job_id"}


@dataclass(frozen=True)
class AttemptHistory:
    """A task's attempts in try order, and the nodes its next job must avoid."""

    attempts: tuple[AttemptRecord, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AttemptHistory:
        if not isinstance(data, Mapping):
            return cls()
        attempts = data.get("attempts") or []
        return cls(
            tuple(AttemptRecord.from_dict(a) for a in attempts if isinstance(a, Mapping)),
            tuple(str(n) for n in data.get("exclude") or []),
        )

    @classmethod
    def of_result(cls, result: Mapping[str, Any] | None) -> AttemptHistory:
        """The attempts a job task's result (its return value or `result` XCom) carries."""
        return cls.from_dict({"attempts": (result or {}).get("attempts")})

    def to_dict(self) -> dict[str, Any]:
        return {"attempts": [a.to_dict() for a in self.attempts], "exclude": list(self.exclude)}

    def get(self, try_number: int) -> AttemptRecord | None:
        return next((a for a in self.attempts if a.try_number == try_number), None)

    def put(self, attempt: AttemptRecord) -> AttemptHistory:
        """With `attempt` as the record of its try (a try decided twice keeps one record), last."""
        others = tuple(a for a in self.attempts if a.try_number != attempt.try_number)
        return replace(self, attempts=(*others, attempt))

    @property
    def rewinds(self) -> list[AttemptRecord]:
        return [a for a in self.attempts if a.rewind]

    def skipped_iterations(self) -> list[int]:
        """Every iteration an earlier rewind skipped: later jobs of the training skip them too (a resume
        before the window passed must not train on it)."""
        skipped: set[int] = set()
        for attempt in self.rewinds:
            window = (attempt.rewind or {}).get("skipped")
            if window:
                skipped.update(range(int(window[0]), int(window[1]) + 1))
        return sorted(skipped)

    def learning_rate(self, resumes_from: int | None) -> tuple[float, int | None] | None:
        """How a job resuming from checkpoint `resumes_from` sets its learning rate after a rewind lowered it:
        (multiplier, the iteration it stops at) while the latest rewind's lowered iterations last, (1.0, None)
        after them (the checkpoint holds the lowered rate: the configured one must replace it); None when no
        rewind lowered it (the schedule the checkpoint holds goes on)."""
        lowered = [(a.rewind or {}).get("learning_rate") for a in self.rewinds]
        if not any(lowered):
            return None
        latest = lowered[-1]
        if latest and (resumes_from or 0) < int(latest["until"]):
            return float(latest["multiplier"]), int(latest["until"])
        return 1.0, None

    def rewound_curves(self) -> tuple[list[list[Any]], list[tuple[dict[str, Any], list[Any]]]]:
        """Each attempt's loss curve without what a rewind discarded, and each rewind with the points it
        discarded. A rewind to K discards every point after K of its own attempt and of the earlier ones (a
        margin can reach back past the attempt's start); later attempts trained the rewound weights."""
        kept, rewinds = self._rewound([a.loss_curve for a in self.attempts], lambda point: point[0])
        return kept, [(rewind, sorted(points)) for rewind, points in rewinds]

    def rewound_validation(self) -> list[list[Any]]:
        """Each attempt's validation points without what a rewind discarded (as `rewound_curves`)."""
        return self._rewound([a.validation for a in self.attempts], lambda point: point.get("iteration"))[0]

    def rewound_saves(self) -> list[list[Any]]:
        """Each attempt's saved checkpoints without those a rewind discarded (as `rewound_curves`)."""
        return self._rewound([a.checkpoints_saved for a in self.attempts], lambda iteration: iteration)[0]

    def _rewound(
        self, series: list[list[Any]], iteration: Callable[[Any], Any]
    ) -> tuple[list[list[Any]], list[tuple[dict[str, Any], list[Any]]]]:
        kept = [list(points or []) for points in series]
        rewinds = []
        for index, attempt in enumerate(self.attempts):
            if not attempt.rewind:
                continue
            target = attempt.rewind.get("rewind_to") or 0

            def after(point: Any, target: int = target) -> bool:
                at = iteration(point)
                return isinstance(at, int | float) and at > target

            rewinds.append((attempt.rewind, [p for points in kept[: index + 1] for p in points if after(p)]))
            kept[: index + 1] = [[p for p in points if not after(p)] for points in kept[: index + 1]]
        return kept, rewinds

    def excluding(self, nodes: Iterable[str]) -> AttemptHistory:
        return replace(self, exclude=tuple(dict.fromkeys([*self.exclude, *nodes])))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
