"""`sweep.early_stop`: the rule that stops a sweep's losing points early, parsed and checked against the
sweep's experiments (monitor/early_stop.py decides at each rung).

    sweep:
      early_stop:
        at: [2000, 8000]           # rungs: the iterations points are compared at
        metric: validation_loss    # or train_loss (the last logged at or before the rung)
        within: model              # the sweep keys whose values make a group (default: the whole sweep)
        keep: 0.5                  # the fraction of a group each rung keeps (rounded up), or:
        within_pct: 3              # keep the points within 3 % of their group's best
        timeout_minutes: 60        # a rung decides on the points it has this long after the first reported

A rule that could never stop anything is refused, naming why: a group of one, a `keep` that keeps every
point of every group, a rung no experiment reaches, a validation loss at a rung Megatron never validates at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_oellm.config.errors import Issue, did_you_mean

EARLY_STOP_KEY = "sweep.early_stop"
METRICS = ("validation_loss", "train_loss")
RULE_KEYS = ("at", "metric", "within", "keep", "within_pct", "timeout_minutes")
DEFAULT_TIMEOUT_MINUTES = 60.0


@dataclass(frozen=True)
class EarlyStopRule:
    rungs: tuple[int, ...]
    metric: str
    within: tuple[str, ...]  # sweep keys; their values make a group
    keep: float | None = None
    within_pct: float | None = None
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES

    def kept(self, ranked: int) -> int:
        """How many of `ranked` points a rung keeps under `keep` (rounded up: one at least)."""
        return ranked if self.keep is None else max(1, math.ceil(self.keep * ranked - 1e-9))

    def group_of(self, parameters: Mapping[str, Any]) -> str:
        """A point's group: its values of the `within` keys (`model=50M`), or `all`."""
        return ", ".join(f"{key}={parameters.get(key)}" for key in self.within) or "all"

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": list(self.rungs),
            "metric": self.metric,
            "within": list(self.within),
            "keep": self.keep,
            "within_pct": self.within_pct,
            "timeout_minutes": self.timeout_minutes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EarlyStopRule:
        return cls(
            tuple(data["at"]),
            data["metric"],
            tuple(data["within"]),
            data.get("keep"),
            data.get("within_pct"),
            data.get("timeout_minutes", DEFAULT_TIMEOUT_MINUTES),
        )


@dataclass(frozen=True)
class RulePoint:
    """What the rule is checked against, of one experiment."""

    name: str
    parameters: Mapping[str, Any]  # its sweep values
    train_iters: int | None
    eval_interval: int | None


def early_stop_rule(
    section: Any, points: Sequence[RulePoint] | None, sweep_keys: Sequence[str]
) -> tuple[EarlyStopRule | None, list[Issue]]:
    """The rule of `sweep.early_stop` (None when there is none), or the issues that refuse it. `points`: the
    sweep's experiments, to refuse a rule that could stop none of them (None: one experiment is loaded)."""
    if section is None:
        return None, []
    if not isinstance(section, Mapping):
        return None, [
            Issue(f"expected a mapping (at, metric, within, keep), got {type(section).__name__}", key=EARLY_STOP_KEY)
        ]
    issues = [
        Issue(
            f"unknown key{did_you_mean(str(k), RULE_KEYS)}; the keys are {', '.join(RULE_KEYS)}",
            key=f"{EARLY_STOP_KEY}.{k}",
        )
        for k in section
        if k not in RULE_KEYS
    ]
    rungs = section.get("at")
    if isinstance(rungs, int) and not isinstance(rungs, bool):
        rungs = [rungs]
    if not isinstance(rungs, list) or not rungs or not all(_whole(r) and r > 0 for r in rungs):
        issues.append(
            Issue(f"expected iterations above 0 (at: [2000, 8000]), got {rungs!r}", key=f"{EARLY_STOP_KEY}.at")
        )
        rungs = []
    elif sorted(set(rungs)) != rungs:
        issues.append(Issue(f"rungs must be increasing, each once: {rungs}", key=f"{EARLY_STOP_KEY}.at"))
    metric = section.get("metric", "validation_loss")
    if metric not in METRICS:
        issues.append(
            Issue(
                f"unknown metric {metric!r}{did_you_mean(str(metric), METRICS)}; one of {', '.join(METRICS)}",
                key=f"{EARLY_STOP_KEY}.metric",
            )
        )
    within = section.get("within", [])
    within = [within] if isinstance(within, str) else within
    if not isinstance(within, list) or not all(isinstance(k, str) for k in within):
        issues.append(Issue(f"expected sweep keys (within: model), got {within!r}", key=f"{EARLY_STOP_KEY}.within"))
        within = []
    for key in within:
        if key not in sweep_keys:
            issues.append(
                Issue(
                    f"{key!r} is not a key of the sweep{did_you_mean(key, sweep_keys)}; its keys are "
                    f"{', '.join(sweep_keys) or 'none'}",
                    key=f"{EARLY_STOP_KEY}.within",
                )
            )
    keep, within_pct = section.get("keep"), section.get("within_pct")
    if (keep is None) == (within_pct is None):
        issues.append(
            Issue("give one of keep (a fraction, 0.5) and within_pct (3: within 3 % of the best)", key=EARLY_STOP_KEY)
        )
    if keep is not None and not (_number(keep) and 0 < keep < 1):
        issues.append(Issue(f"expected a fraction between 0 and 1, got {keep!r}", key=f"{EARLY_STOP_KEY}.keep"))
    if within_pct is not None and not (_number(within_pct) and within_pct > 0):
        issues.append(Issue(f"expected a percentage above 0, got {within_pct!r}", key=f"{EARLY_STOP_KEY}.within_pct"))
    timeout = section.get("timeout_minutes", DEFAULT_TIMEOUT_MINUTES)
    if not (_number(timeout) and timeout > 0):
        issues.append(Issue(f"expected minutes above 0, got {timeout!r}", key=f"{EARLY_STOP_KEY}.timeout_minutes"))
    if issues:
        return None, issues
    rule = EarlyStopRule(tuple(rungs), metric, tuple(within), keep, within_pct, float(timeout))
    return rule, [] if points is None else _no_op_issues(rule, points)


def _no_op_issues(rule: EarlyStopRule, points: Sequence[RulePoint]) -> list[Issue]:
    """Why the rule could never stop a point of this sweep (none: it can)."""
    issues = []
    for rung in rule.rungs:
        reaching = [p for p in points if p.train_iters is None or p.train_iters > rung]
        if not reaching:
            longest = max((p.train_iters or 0) for p in points) if points else 0
            issues.append(
                Issue(
                    f"rung {rung}: no experiment trains past it (the longest trains {longest} iterations)",
                    key=f"{EARLY_STOP_KEY}.at",
                )
            )
        if rule.metric == "validation_loss":
            unvalidated = [p.name for p in reaching if not p.eval_interval or rung % p.eval_interval]
            if unvalidated:
                intervals = sorted({p.eval_interval or 0 for p in reaching if p.name in unvalidated})
                issues.append(
                    Issue(
                        f"rung {rung}: {', '.join(unvalidated[:3])}{' ...' if len(unvalidated) > 3 else ''} "
                        f"validate every {', '.join(map(str, intervals))} iterations (backend.args.eval_interval; 0: "
                        "never), not at the rung: it would never be compared",
                        key=f"{EARLY_STOP_KEY}.at",
                    )
                )
    groups: dict[str, int] = {}
    for p in points:
        groups[rule.group_of(p.parameters)] = groups.get(rule.group_of(p.parameters), 0) + 1
    if groups and max(groups.values()) < 2:
        issues.append(
            Issue(
                f"every group has one point ({', '.join(list(groups)[:3])}): there is nothing to compare",
                key=f"{EARLY_STOP_KEY}.within",
            )
        )
    elif rule.keep is not None and all(rule.kept(n) == n for n in groups.values()):
        largest = max(groups.values())
        issues.append(
            Issue(
                f"keep {rule.keep} keeps every point of every group (the largest has {largest}: "
                f"{rule.kept(largest)} kept); lower it",
                key=f"{EARLY_STOP_KEY}.keep",
            )
        )
    return issues


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
