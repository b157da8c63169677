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

import json
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


@dataclass(frozen=True)
class PointProgress:
    """What the sweep knows of one point's training now."""

    iteration: int | None  # the last it logged (None: not started)
    training: bool  # training, or about to (queued, retrying): it may yet reach a rung
    validation: Sequence[Mapping[str, Any]] = ()  # validation points, over its attempts
    curve: Sequence[Sequence[float]] = ()  # [iteration, train loss]


@dataclass
class EarlyStopState:
    """The rungs of one run of the sweep DAG: what they heard and decided (kept on the cluster beside the
    sweep's analysis, so a restarted task carries on; another run of the sweep starts afresh)."""

    sweep_run_id: str
    rungs: dict[str, Rung] = field(default_factory=dict)  # "<group> @ <rung>"

    @classmethod
    def start(cls, rule: EarlyStopRule, sweep_run_id: str, members: Mapping[str, Mapping[str, Any]]) -> EarlyStopState:
        return cls(sweep_run_id, {f"{g} @ {r}": rung for (g, r), rung in rungs_of(rule, members).items()})

    def to_json(self) -> bytes:
        rungs = {key: rung.to_dict() for key, rung in self.rungs.items()}
        return json.dumps({"sweep_run_id": self.sweep_run_id, "rungs": rungs}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | None, sweep_run_id: str) -> EarlyStopState | None:
        """The saved state of this run of the sweep, or None (none saved, unreadable, or another run's)."""
        try:
            loaded = json.loads(data or b"")
            if loaded["sweep_run_id"] != sweep_run_id:
                return None
            return cls(sweep_run_id, {key: Rung.from_dict(r) for key, r in loaded["rungs"].items()})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def verdicts(self) -> list[RungVerdict]:
        return [v for rung in self.rungs.values() for v in rung.verdicts.values()]


def early_stop_round(
    rule: EarlyStopRule, state: EarlyStopState, progress: Mapping[str, PointProgress], now: float
) -> list[RungVerdict]:
    """One look at the sweep: each point's metric at each rung it has reached is reported once, and the rungs
    that may decide do. Returns the new verdicts (the stops to ask for, and the points kept)."""
    new = []
    for rung in sorted(state.rungs.values(), key=lambda r: r.rung):
        for name in rung.members:
            point = progress.get(name)
            if point is None or name in rung.reported or point.iteration is None or point.iteration < rung.rung:
                continue
            value = metric_at(rung.rung, rule.metric, point.validation, point.curve)
            if value is None and point.iteration == rung.rung:
                continue  # Megatron validates after the rung's iteration line: it may be on its way
            rung.report(name, value, now)
        # a point still training below the rung holds the rung up (until the timeout); one that ended does not
        waiting = [n for n in rung.members if (p := progress.get(n)) is None or p.training]
        new += rung.decide(rule, waiting, now)
    return new


def saved_hours(train_iters: int, stopped_at: int, iteration_ms: float | None, gpus: int) -> tuple[float, float]:
    """(hours, GPU-hours) a stopped training did not spend: its remaining iterations at its pace."""
    if not iteration_ms or stopped_at >= train_iters:
        return 0.0, 0.0
    hours = (train_iters - stopped_at) * iteration_ms / 1000 / 3600
    return hours, hours * gpus


STOP_REQUEST_LIMIT = 4096  # bytes of a stop request read per poll cycle


@dataclass(frozen=True)
class StopRequest:
    """`<output_dir>/.oellm/early_stop.json`: the sweep's early stopping asks the training of the experiment's
    DAG run `run_id` to stop (the follower of its job cancels it and the task ends skipped, with `reason`); a
    later run of the experiment is not concerned. `resumed`: a user cleared the stopped task to train on, and
    the request stands no more."""

    reason: str
    rung: int
    run_id: str
    resumed: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | None) -> StopRequest | None:
        """The request a file holds, or None (no file, or not a request)."""
        try:
            loaded = json.loads(data or b"")
            request = cls(
                str(loaded["reason"]), int(loaded["rung"]), str(loaded["run_id"]), loaded.get("resumed") is True
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        return request

    def standing_for(self, run_id: str | None) -> bool:
        """Whether the training of DAG run `run_id` is to stop."""
        return not self.resumed and self.run_id == run_id
