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

from airflow_oellm.megatron.logs import node_from_groups
from airflow_oellm.slurm.states import JobState

SUCCESS, RETRY, FATAL = "success", "retry", "fatal"


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

    @property
    def progressed(self) -> bool:
        return (self.checkpoint_after or 0) > (self.checkpoint_before or 0)


@dataclass(frozen=True)
class Rule:
    verdict: str
    reason: str
    states: frozenset[JobState] | None = None
    pattern: str | None = None
    when: str | None = None  # hang | training_done | unfinished_progress | unfinished_no_progress | startup
    node_pattern: str | None = None  # extracts the node to exclude next time

    def matches(self, outcome: Outcome) -> re.Match[str] | bool:
        if self.states is not None and outcome.state not in self.states:
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
}

_NODE_FAILURE = (
    r"failed on node (?P<node>[^:\s]+): Communication connection failure|Node failure on (?P<node2>\S+)"
    r"|JOB \d+ ON (?P<node3>\S+) CANCELLED AT \S+ DUE TO NODE FAILURE"
)

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(RETRY, "hang: no log growth and no iteration progress", when="hang"),
    Rule(FATAL, "cancelled by a user", states=frozenset({JobState.CANCELLED}), when="user_cancel"),
    Rule(FATAL, "CUDA out of memory", pattern=r"CUDA out of memory|OutOfMemoryError|Failed to CUDA calloc"),
    Rule(FATAL, "host memory exhausted (OUT_OF_MEMORY)", states=frozenset({JobState.OUT_OF_MEMORY})),
    Rule(RETRY, "node failure", pattern=_NODE_FAILURE, node_pattern=_NODE_FAILURE),
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

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "exclude_nodes": list(self.exclude_nodes)}


def rules_from_config(items: Iterable[Mapping[str, Any]]) -> list[Rule]:
    """Rules given as mappings: verdict, reason, states (list), pattern, when."""
    rules = []
    for item in items:
        states = item.get("states")
        rules.append(
            Rule(
                item["verdict"],
                item.get("reason", item.get("pattern") or "configured rule"),
                frozenset(JobState.parse(s) for s in states) if states else None,
                item.get("pattern"),
                item.get("when"),
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
        return Classification(rule.verdict, rule.reason, nodes)
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
