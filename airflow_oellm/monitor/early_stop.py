"""The decisions of `sweep.early_stop` (config/early_stop.py) at each rung, without Airflow: successive
halving as ASHA does it (Li et al. 2020), a rung never waiting for stragglers for ever.

At a rung, a group decides once every member still training has reported the metric there, or
`timeout_minutes` after its first report: it ranks the points it has and keeps the best `keep` fraction
(rounded up) or those within `within_pct` of the best. The values of the kept set's worst point and of the
best point are the rung's bar: a point that reports after the decision is kept only if it clears the same
bar. A verdict is never revised: a point kept stays kept at that rung, and a stopped point that a user
resumes (by clearing its training) is not stopped again at that rung.

A point that ends before a rung (it finished, or failed for good) or has no finite value there is not
ranked and does not hold the rung up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_oellm.config.early_stop import EarlyStopRule


@dataclass(frozen=True)
class RungVerdict:
    experiment: str
    rung: int
    stop: bool
    rank: int  # 1 is the best of the points ranked
    of: int
    value: float
    best: float

    @property
    def reason(self) -> str:
        """`stopped early: rank 7/9 at 2000 (loss 3.41 vs best 3.12)`, or `kept: ...`."""
        what = "stopped early" if self.stop else "kept"
        return f"{what}: rank {self.rank}/{self.of} at {self.rung} (loss {self.value:.4g} vs best {self.best:.4g})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RungVerdict:
        return cls(**{k: data[k] for k in ("experiment", "rung", "stop", "rank", "of", "value", "best")})


@dataclass
class Rung:
    """One group at one rung: what its members reported, and once it decided, the bar and the verdicts."""

    rung: int
    members: tuple[str, ...]
    reported: dict[str, float] = field(default_factory=dict)
    first_report: float | None = None  # when (epoch seconds)
    bar: float | None = None  # the worst value the decision kept; None until it decides
    best: float | None = None
    verdicts: dict[str, RungVerdict] = field(default_factory=dict)

    def report(self, experiment: str, value: float | None, now: float) -> None:
        """A member's metric at the rung (None: it has none there); the first report of each member counts."""
        if experiment in self.reported or experiment not in self.members:
            return
        if value is None or not math.isfinite(value):
            self.reported[experiment] = math.nan
        else:
            self.reported[experiment] = float(value)
        if self.first_report is None:
            self.first_report = now

    def decide(self, rule: EarlyStopRule, waiting_for: Iterable[str], now: float) -> list[RungVerdict]:
        """The verdicts that are due: all of the reported points once the rung may decide (every member in
        `waiting_for`, the ones still training before the rung, has reported, or the timeout has passed);
        afterwards, each late point's against the bar. Verdicts given earlier are not repeated."""
        waiting = [e for e in waiting_for if e in self.members and e not in self.reported]
        ranked = {e: v for e, v in self.reported.items() if math.isfinite(v)}
        if self.bar is None:
            timed_out = self.first_report is not None and now - self.first_report >= rule.timeout_minutes * 60
            if not ranked or (waiting and not timed_out):
                return []
            order = sorted(ranked, key=lambda e: (ranked[e], e))
            self.best = ranked[order[0]]
            if rule.within_pct is not None:
                self.bar = self.best + abs(self.best) * rule.within_pct / 100
            else:
                self.bar = ranked[order[rule.kept(len(order)) - 1]]
        new = []
        order = sorted(ranked, key=lambda e: (ranked[e], e))
        for experiment in order:
            if experiment in self.verdicts:
                continue
            value = ranked[experiment]
            verdict = RungVerdict(
                experiment, self.rung, value > self.bar, order.index(experiment) + 1, len(order), value,
                min(self.best, value),
            )  # fmt: skip
            self.verdicts[experiment] = verdict
            new.append(verdict)
        return new

    def to_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "members": list(self.members),
            "reported": {e: (None if math.isnan(v) else v) for e, v in self.reported.items()},
            "first_report": self.first_report,
            "bar": self.bar,
            "best": self.best,
            "verdicts": {e: v.to_dict() for e, v in self.verdicts.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rung:
        return cls(
            rung=int(data["rung"]),
            members=tuple(data["members"]),
            reported={e: (math.nan if v is None else float(v)) for e, v in data.get("reported", {}).items()},
            first_report=data.get("first_report"),
            bar=data.get("bar"),
            best=data.get("best"),
            verdicts={e: RungVerdict.from_dict(v) for e, v in data.get("verdicts", {}).items()},
        )


def rungs_of(rule: EarlyStopRule, experiments: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, int], Rung]:
    """Every (group, rung) of a sweep: `experiments` maps each experiment's name to its sweep values."""
    groups: dict[str, list[str]] = {}
    for name, parameters in experiments.items():
        groups.setdefault(rule.group_of(parameters), []).append(name)
    return {(group, rung): Rung(rung, tuple(members)) for group, members in groups.items() for rung in rule.rungs}


def metric_at(
    rung: int, metric: str, validation: Sequence[Mapping[str, Any]], curve: Sequence[Sequence[float]]
) -> float | None:
    """A training's metric at a rung: its validation loss logged at the rung, or its last train loss logged at
    or before it (None while it has not reached the rung)."""
    if metric == "validation_loss":
        found = [p.get("loss") for p in validation if p.get("iteration") == rung and p.get("split", "validation")
                 == "validation"]  # fmt: skip
        return found[-1] if found and isinstance(found[-1], int | float) else None
    if not curve or curve[-1][0] < rung:
        return None
    before = [loss for iteration, loss in curve if iteration <= rung]
    return before[-1] if before else None
