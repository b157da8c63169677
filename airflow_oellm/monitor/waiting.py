"""Decisions of the sensors that run beside a training task: is checkpoint N there, has the event
happened, or will it never (the training failed for good or finished below)?

The training task publishes its status in `<output>/.oellm/status/<task>.json` (state running /
retrying / failed / completed, its job id and log, the DAG run id). A status of another DAG run
counts as "not started yet".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_oellm.config.expressions import Expression, ExpressionError
from airflow_oellm.megatron.checkpoints import CheckpointState, never, ready

FINAL_TRAINING_STATES = ("failed", "completed")


def training_status(data: bytes | None, run_id: str | None) -> dict[str, Any] | None:
    """The training task's status for this DAG run, or None (absent, unreadable, or another run's)."""
    if not data:
        return None
    try:
        status = json.loads(data.decode())
    except ValueError:
        return None
    if not isinstance(status, dict) or (run_id is not None and status.get("run_id") != run_id):
        return None
    return status


@dataclass(frozen=True)
class Decision:
    kind: str  # wait | ready | never | training_failed | training_ended
    message: str = ""
    payload: Mapping[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.kind != "wait"


def checkpoint_decision(
    state: CheckpointState, checkpoint_dir: str, iteration: int, at_least: bool, training: Mapping[str, Any] | None
) -> Decision:
    found = ready(state, checkpoint_dir, iteration, at_least=at_least)
    if found is not None:
        return Decision("ready", f"checkpoint {found.iteration} is complete ({found.format})", found.to_dict())
    reason = never(state, iteration, at_least=at_least)
    if reason:
        return Decision("never", reason)
    if training and training.get("state") == "failed":
        return Decision(
            "training_failed",
            f"the training failed for good: {training.get('reason', 'no reason given')}"
            f" (latest checkpoint {state.latest})",
        )
    if training and training.get("state") == "completed":
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
