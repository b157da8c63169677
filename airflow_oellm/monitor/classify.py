"""What a finished training job means: success, retry (resume from the checkpoint), or fatal.

Rules are checked in order, first match wins; each names SLURM states and/or a regex on the tail
of the log, or a fact the watcher knows (hang, training finished, progress made). The defaults
follow what HPC training runs actually die of; a config can put its own rules first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_oellm.megatron.logs import GPU_HARDWARE_ERROR, RERUN_NODE, node_from_groups
from airflow_oellm.slurm.states import JobState

SUCCESS, RETRY, FATAL = "success", "retry", "fatal"
STOPPED = "stopped"  # by the sweep's early stopping (monitor/early_stop.py): neither a success nor a failure
NAN_INTERVALS = 3  # log intervals in a row with a NaN or infinite loss that make a diverged training


@dataclass(frozen=True)
class Outcome:
    """Everything known about one attempt when its job has ended."""

    state: JobState
    exit_code: int | None = None
    cancelled_by: str | None = None
    log_tail: str = ""
    hang: bool = False
    cancelled_by_us: bool = False
    training_done: bool = False
    iterations_run: int = 0  # iteration lines seen in this attempt
    checkpoint_before: int | None = None
    checkpoint_after: int | None = None
    training: bool = True  # a training job (success needs Megatron's "training is done"), or any other job
    nan_intervals: int = 0  # consecutive log intervals, up to the last, with a NaN or infinite loss
    nan_limit: int = NAN_INTERVALS  # that many make the loss diverged (0: never)

    @property
    def progressed(self) -> bool:
        return (self.checkpoint_after or 0) > (self.checkpoint_before or 0)


def attempt_outcome(
    state: JobState,
    summary: Mapping[str, Any],
    tail: str,
    *,
    exit_code: int | None = None,
    cancelled_by: str | None = None,
    hang: bool = False,
    cancelled_by_us: bool = False,
    checkpoint_before: int | None = None,
    checkpoint_after: int | None = None,
    training: bool = True,
    nan_limit: int = NAN_INTERVALS,
) -> Outcome:
    """An attempt's outcome from what its watch summarised (`monitor/watch.py`) and the end of its log."""
    return Outcome(
        state=state,
        exit_code=exit_code,
        cancelled_by=cancelled_by,
        # the fault lines the watch kept, in case the tail no longer reaches back to them
        log_tail=tail + "\n" + "\n".join(summary.get("faults", [])),
        hang=hang,
        cancelled_by_us=cancelled_by_us,
        training_done=bool(summary.get("training_done")),
        iterations_run=int(summary.get("iterations_run", 0)),
        checkpoint_before=checkpoint_before,
        checkpoint_after=checkpoint_after,
        training=training,
        nan_intervals=int(summary.get("nan_intervals", 0)),
        nan_limit=nan_limit,
    )


@dataclass(frozen=True)
class Rule:
    verdict: str
    reason: str  # may name the pattern's `detail` group: "... ({detail})"
    states: frozenset[JobState] | None = None
    pattern: str | None = None
    when: str | None = None  # one of WHEN
    node_pattern: str | None = None  # extracts the node to exclude next time
    exit_codes: frozenset[int] | None = None
    # an attempt that by design saves no new checkpoint (the rerun state machine's resume): the
    # progress guard does not hold it against the training
    progress_free: bool = False

    def matches(self, outcome: Outcome) -> re.Match[str] | bool:
        if self.states is not None and outcome.state not in self.states:
            return False
        if self.exit_codes is not None and outcome.exit_code not in self.exit_codes:
            return False
        if self.when and not _FACTS[self.when](outcome):
            return False
        if self.pattern is not None:
            return re.search(self.pattern, outcome.log_tail, re.MULTILINE) or False
        return True


_FACTS = {
    "hang": lambda o: o.hang,
    "not_training": lambda o: not o.training,
    "training_done": lambda o: o.training_done,
    "unfinished_progress": lambda o: not o.training_done and o.progressed,
    "unfinished_no_progress": lambda o: not o.training_done and not o.progressed,
    "startup": lambda o: o.iterations_run == 0,
    "user_cancel": lambda o: bool(o.cancelled_by) and not o.cancelled_by_us and not o.hang,
    "nan": lambda o: o.nan_limit > 0 and o.nan_intervals >= o.nan_limit,
}
WHEN = tuple(_FACTS)

_NODE_FAILURE = (
    r"failed on node (?P<node>[^:\s]+): Communication connection failure|Node failure on (?P<node2>\S+)"
    r"|JOB \d+ ON (?P<node3>\S+) CANCELLED AT \S+ DUE TO NODE FAILURE"
)

# srun's line for a task that died names its node; the rerun state machine names node and device
_FAILED_TASK_NODE = r"srun: error: (?P<node3>[^:\s]+): tasks? [\d,\-]+: |" + RERUN_NODE

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(RETRY, "hang: no log growth and no iteration progress", when="hang"),
    Rule(FATAL, "cancelled by a user", states=frozenset({JobState.CANCELLED}), when="user_cancel"),
    Rule(FATAL, "CUDA out of memory", pattern=r"CUDA out of memory|OutOfMemoryError|Failed to CUDA calloc"),
    Rule(FATAL, "host memory exhausted (OUT_OF_MEMORY)", states=frozenset({JobState.OUT_OF_MEMORY})),
    # Megatron's rerun state machine (core 0.10+; on by default since 0.14): 17 = the result failed validation,
    # unless a rerun on the same GPU did not reproduce it (a transient fault: the next job may well pass)
    Rule(
        RETRY,
        "a transient fault, not reproduced on rerun (Megatron's rerun state machine, exit 17)",
        pattern=r"Possible transient error",
    ),
    Rule(
        FATAL,
        "failed on result validation (Megatron's rerun state machine, exit 17): {detail}",
        pattern=r"(?s)node [^,\s]+, device \d+(?:, iteration #?\d+)?: (?P<detail>[^\n]*?)!*\n"
        r"(?:(?!node [^,\s]+, device).)*?Exiting now\. A checkpoint at the last iteration already exists",
    ),
    Rule(
        FATAL,
        "failed on result validation (Megatron's rerun state machine, exit 17)",
        exit_codes=frozenset({17}),
    ),
    # 16 = a checkpoint is saved: resume from it on another GPU to tell a faulty GPU from a real result
    Rule(
        RETRY,
        "resume on another GPU to check a result (Megatron's rerun state machine, exit 16)",
        pattern=r"Saving a checkpoint and exiting now\. Please resume the job|Please resume the job from the same"
        r" checkpoint|Got rescheduled on the same GPU",
        node_pattern=RERUN_NODE,
        progress_free=True,
    ),
    Rule(
        RETRY,
        "resume on another GPU to check a result (Megatron's rerun state machine, exit 16)",
        exit_codes=frozenset({16}),
        progress_free=True,
    ),
    Rule(FATAL, "the loss diverged: NaN or infinite in the last log intervals", when="nan"),
    Rule(
        FATAL,
        "NaN in the loss or the gradients (Megatron's check): {detail}",
        pattern=r"(?P<detail>found NaN in local[^\n.]*|Unexpected result (?:tensor\()?(?:nan|inf)[^\n]*)",
    ),
    Rule(RETRY, "node failure", pattern=_NODE_FAILURE, node_pattern=_NODE_FAILURE),
    Rule(RETRY, "GPU hardware error", pattern=GPU_HARDWARE_ERROR, node_pattern=_FAILED_TASK_NODE),
    Rule(RETRY, "time limit reached", states=frozenset({JobState.TIMEOUT})),
    Rule(RETRY, "preempted", states=frozenset({JobState.PREEMPTED})),
    Rule(RETRY, "node failure (NODE_FAIL)", states=frozenset({JobState.NODE_FAIL})),
    Rule(RETRY, "node did not boot (BOOT_FAIL)", states=frozenset({JobState.BOOT_FAIL})),
    Rule(
        RETRY,
        "NCCL / communication error",
        pattern=r"NCCL (?:ERROR|error)|ProcessGroupNCCL.*?(?:timeout|Watchdog caught)|DistBackendError"
        r"|NCCL WARN NET/IB",
    ),
    Rule(SUCCESS, "completed", states=frozenset({JobState.COMPLETED}), when="not_training"),
    Rule(SUCCESS, "training finished", states=frozenset({JobState.COMPLETED}), when="training_done"),
    Rule(
        RETRY,
        "exited before the last iteration after making progress (e.g. --exit-duration-in-mins)",
        states=frozenset({JobState.COMPLETED}),
        when="unfinished_progress",
    ),
    Rule(
        FATAL,
        "completed without finishing training and without progress",
        states=frozenset({JobState.COMPLETED}),
        when="unfinished_no_progress",
    ),
    Rule(
        FATAL,
        "Python traceback before the first iteration (configuration or code error)",
        states=frozenset({JobState.FAILED}),
        pattern=r"Traceback \(most recent call last\)",
        when="startup",
    ),
    Rule(FATAL, "deadline passed (DEADLINE)", states=frozenset({JobState.DEADLINE})),
    Rule(RETRY, "crashed (FAILED)", states=frozenset({JobState.FAILED})),
    Rule(RETRY, "the job vanished from squeue and sacct", states=frozenset({JobState.NOT_FOUND})),
)


@dataclass(frozen=True)
class Classification:
    verdict: str
    reason: str
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    progress_free: bool = False  # not held against the progress guard (see Rule)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "exclude_nodes": list(self.exclude_nodes),
            "progress_free": self.progress_free,
        }


def rules_from_config(items: Iterable[Mapping[str, Any]]) -> list[Rule]:
    """Rules given as mappings: verdict, reason, states (list), exit_codes (list), pattern, when, node_pattern."""
    rules = []
    for item in items:
        states = item.get("states")
        codes = item.get("exit_codes")
        rules.append(
            Rule(
                item["verdict"],
                item.get("reason") or item.get("pattern") or "configured rule",
                frozenset(JobState.parse(s) for s in states) if states else None,
                item.get("pattern"),
                item.get("when"),
                item.get("node_pattern"),
                frozenset(int(c) for c in codes) if codes else None,
            )
        )
    return rules


def classify(outcome: Outcome, rules: Sequence[Rule] = DEFAULT_RULES) -> Classification:
    for rule in rules:
        match = rule.matches(outcome)
        if not match:
            continue
        nodes: tuple[str, ...] = ()
        if rule.node_pattern:
            found = [node_from_groups(m.groupdict()) for m in re.finditer(rule.node_pattern, outcome.log_tail)]
            nodes = tuple(dict.fromkeys(n for n in found if n))
        reason = rule.reason
        if "{detail}" in reason:
            detail = match.groupdict().get("detail") if isinstance(match, re.Match) else None
            reason = reason.replace("{detail}", (detail or "").strip()[:300]).removesuffix(": ")
        return Classification(rule.verdict, reason, nodes, rule.progress_free)
    return Classification(FATAL, f"unclassified final state {outcome.state.value}")


def progress_guard(checkpoints: Sequence[int | None]) -> str | None:
    """Why another retry is pointless, or None.

    `checkpoints` is the checkpoint iteration before the first attempt followed by the one after
    each attempt. Two attempts in a row that did not advance it mean the next would not either.
    """
    values = [c or 0 for c in checkpoints]
    if len(values) >= 3 and values[-1] <= values[-2] <= values[-3]:
        return (
            f"no progress over the last two attempts: the checkpoint stayed at iteration {values[-1]} "
            f"(history {values})"
        )
    return None
