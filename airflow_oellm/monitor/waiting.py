"""Decisions of the sensors that run beside a training task: is checkpoint N there, has the event
happened, or will it never (the training failed for good or finished below)?

The training task publishes its status in `<output>/.oellm/status/<task>.json` (state running /
retrying / failed / completed, its job id and log, the DAG run id). A status of another DAG run
counts as "not started yet".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_oellm.config.expressions import Expression, ExpressionError
from airflow_oellm.megatron.checkpoints import CheckpointState, never, ready
from airflow_oellm.monitor.events import Event, EventMatcher, EventSpec
from airflow_oellm.monitor.inactivity import Activity
from airflow_oellm.monitor.records import TrainingState, TrainingStatus
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.states import JobState, JobStatus


@dataclass(frozen=True)
class Decision:
    kind: str  # wait | ready | never | training_failed | training_ended
    message: str = ""
    payload: Mapping[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.kind != "wait"


def checkpoint_decision(
    state: CheckpointState, checkpoint_dir: str, iteration: int, at_least: bool, training: TrainingStatus | None
) -> Decision:
    found = ready(state, checkpoint_dir, iteration, at_least=at_least)
    suspect = training.suspect_from if training and training.state is TrainingState.RUNNING else None
    if found is not None and suspect is not None and found.iteration >= suspect:
        # saved while the loss is wrong: it recovers (the checkpoint stands) or is rewound (it goes, and the
        # rewound run saves this iteration again, or skips it)
        return Decision("wait")
    if found is not None:
        return Decision("ready", f"checkpoint {found.iteration} is complete ({found.format})", found.to_dict())
    reason = never(state, iteration, at_least=at_least)
    if reason:
        return Decision("never", reason)
    if training and training.state is TrainingState.FAILED:
        return Decision(
            "training_failed",
            f"the training failed for good: {training.reason or 'no reason given'} (latest checkpoint {state.latest})",
        )
    if training and training.state is TrainingState.STOPPED:
        return Decision("training_stopped", f"{training.reason or 'stopped early'} (latest checkpoint {state.latest})")
    if training and training.state is TrainingState.COMPLETED:
        return Decision("training_ended", f"the training finished at checkpoint {state.latest}, below {iteration}")
    return Decision("wait")


def event_condition(text: str | None) -> Expression | None:
    return Expression(text) if text else None


def event_satisfies(condition: Expression | None, groups: Mapping[str, Any]) -> bool:
    """`iteration >= 50000` over an event's groups; a condition naming a missing group is not met."""
    if condition is None:
        return True
    try:
        return bool(condition.evaluate(dict(groups)))
    except ExpressionError:
        return False


@dataclass(frozen=True)
class LogDecision:
    kind: str  # wait | matched | inactive | ended
    message: str = ""
    job_id: str | None = None
    event: Event | None = None

    def to_event(self) -> dict[str, Any]:
        """The trigger event this decision fires."""
        if self.kind == "matched" and self.event is not None:
            return {"kind": self.kind, "job_id": self.job_id, **self.event.to_dict()}
        found = {"kind": self.kind, "message": self.message}
        return found if self.job_id is None else {"kind": self.kind, "job_id": self.job_id, "message": self.message}


@dataclass
class LogWait:
    """Waiting for a log event: in one job's log, or in the log of whatever job the training task beside
    it runs now (its status file), across resubmissions. The trigger and the poke path feed it what
    they read and do what it decides."""

    spec: EventSpec
    condition: Expression | None = None
    target: tuple[str, str] | None = None  # (job id, log path)
    follows_training: bool = False
    inactivity_threshold: float | None = None
    matcher: EventMatcher = field(init=False)
    activity: Activity | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.matcher = EventMatcher([self.spec])

    def retarget(self, training: TrainingStatus | None) -> bool:
        """Follow the training's job; True when that is a job not watched yet (its log is read from the start)."""
        if not (training and training.job_id) or (self.target is not None and training.job_id == self.target[0]):
            return False
        self.target = (str(training.job_id), training.log_path or "")
        self.matcher, self.activity = EventMatcher([self.spec]), None
        return True

    def read_request(self, read_bytes: int) -> tuple[str, int, int] | None:
        return (self.target[1], self.matcher.offset, read_bytes) if self.target else None

    def apply(
        self, now: float, status: JobStatus | None, chunk: FileChunk | None, training: TrainingStatus | None
    ) -> LogDecision:
        """What the target job's status and the log bytes read from the matcher's offset decide (with no
        job yet: wait for the training's first, unless the training is over)."""
        if self.target is None:
            if training and training.state.final:
                return LogDecision("ended", f"the training {training.state.value} without the event {self.spec.name}")
            return LogDecision("wait")
        job_id, log_path = self.target
        finished = status is not None and status.is_terminal
        drained = chunk is None or chunk.size is None or chunk.end >= chunk.size
        _, events = self.matcher.feed(
            chunk.data if chunk else b"", final=finished and chunk is not None and chunk.size is not None and drained
        )
        for event in events:
            if event_satisfies(self.condition, event.groups):
                return LogDecision("matched", job_id=job_id, event=event)
        running = status is not None and status.state is JobState.RUNNING
        size = chunk.size if chunk is not None else None
        self.activity = (self.activity or Activity(last_change=now)).observe(now, running=running, log_size=size)
        if self.inactivity_threshold and self.activity.is_hung(now, self.inactivity_threshold):
            return LogDecision("inactive", f"log {log_path} did not grow for {self.inactivity_threshold:.0f} s", job_id)
        if finished and drained:
            still_training = training is not None and not training.state.final
            if self.follows_training and (training is None or still_training):
                return LogDecision("wait")  # a retry will submit the next job: follow it
            state = status.state.value if status else "?"
            return LogDecision("ended", f"job {job_id} ended ({state}) without the event {self.spec.name}", job_id)
        return LogDecision("wait")
