"""Loss spikes, grad-norm spikes and NaN losses, found in a training's iteration lines as they arrive.

A spike rule keeps a robust baseline of one iteration-line field (the loss, the grad norm) over its
last `window` normal values: the level is the median of the last few, the noise is the spread of the
interval-to-interval changes (1.4826 x their median absolute deviation, over sqrt 2), which a falling
loss curve does not inflate as it would the values' own spread. A value above
`level + max(threshold_sigmas * noise, min_rise * |level|)` is high; `sustain` high values in a row are a
spike, which begins at the first of them. The baseline is frozen while a spike lasts, so
the spike never becomes its own baseline. Back under the threshold, the spike has recovered by itself:
an event, not an action. Still high `recover_within` intervals after it began, it is unrecovered:
what a rewind acts on. A NaN or infinite loss (or grad norm), or a log interval that counts NaN
iterations, begins a NaN anomaly at once.

Every anomaly names the checkpoint to rewind to: the last one saved at or before the last normal log
interval before it began, `rewind_margin` iterations earlier still. The detector is pure and its
state is a small JSON document, kept in the watch state, so a restarted watch goes on where it was.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_oellm.config.schema import AnomaliesConfig, LossSpikeConfig
from airflow_oellm.megatron.logs import is_finite_number
from airflow_oellm.monitor.classify import NAN_INTERVALS
from airflow_oellm.monitor.events import Event

MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation
LEVEL_INTERVALS = 5  # the level is the median of this many last normal values: a trend barely lags it
NAN_FIELDS = ("loss", "grad_norm")
MAX_CHECKPOINTS = 256  # checkpoint iterations remembered for rewind targets
ANOMALY = {"kind": "anomaly"}
_ITERATION_IN_LINE = re.compile(r"iteration #?(\d+)")


def is_nan_interval(groups: Mapping[str, Any]) -> bool:
    """An iteration line with a NaN loss: fp16 skips the step and counts it in `number of nan
    iterations`; bf16 does not skip it, so the interval's loss is left out and its grad norm reads `nan`."""
    nan_iterations = groups.get("nan_iterations")
    counted = is_finite_number(nan_iterations) and nan_iterations > 0
    return counted or any(k in groups and not is_finite_number(groups[k]) for k in NAN_FIELDS)


@dataclass(frozen=True)
class SpikeRule:
    """When a series (an iteration-line field) spikes; the events are `<event>`, `<event>_recovered`
    and `<event>_unrecovered`."""

    series: str
    event: str
    window: int
    min_history: int
    threshold_sigmas: float
    min_rise: float
    sustain: int
    recover_within: int | None

    @classmethod
    def from_config(cls, series: str, event: str, config: LossSpikeConfig) -> SpikeRule:
        c = config
        return cls(series, event, c.window, c.min_history, c.threshold_sigmas, c.min_rise, c.sustain, c.recover_within)

    def threshold(self, values: Sequence[float]) -> tuple[float, float] | None:
        """(level, threshold) of a baseline, or None when it is too short or not finite."""
        if len(values) < self.min_history:
            return None
        level = statistics.median(values[-LEVEL_INTERVALS:])
        changes = [b - a for a, b in itertools.pairwise(values)]
        usual = statistics.median(changes)
        noise = MAD_TO_SIGMA * statistics.median(abs(c - usual) for c in changes) / math.sqrt(2)
        threshold = level + max(self.threshold_sigmas * noise, self.min_rise * abs(level))
        return (level, threshold) if math.isfinite(threshold) else None


# the config's spike rules: which iteration-line field each judges, and its event
SPIKE_SERIES = (("loss_spike", "loss"), ("grad_norm_spike", "grad_norm"))


@dataclass(frozen=True)
class AnomalySettings:
    """The spike rules, how long a NaN loss lasts before it is unrecovered, and how far before an anomaly a
    rewind goes (JSON-safe, for triggers)."""

    rules: tuple[SpikeRule, ...]
    rewind_margin: int
    nan_intervals: int = NAN_INTERVALS  # monitoring.nan_intervals (0: a NaN loss is never unrecovered)

    @classmethod
    def from_config(cls, config: AnomaliesConfig | None = None, nan_intervals: int = NAN_INTERVALS) -> AnomalySettings:
        """The settings of `monitoring.anomalies` (the defaults when None) and `monitoring.nan_intervals`."""
        config = config or AnomaliesConfig()
        rules = []
        for event, series in SPIKE_SERIES:
            rule = getattr(config, event)
            if rule is not None:
                rules.append(SpikeRule.from_config(series, event, rule))
        return cls(tuple(rules), config.rewind_margin, nan_intervals)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [asdict(r) for r in self.rules],
            "rewind_margin": self.rewind_margin,
            "nan_intervals": self.nan_intervals,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AnomalySettings:
        if data is None:
            return cls.from_config()
        rules = tuple(SpikeRule(**r) for r in data.get("rules", []))
        return cls(rules, int(data.get("rewind_margin", 0)), int(data.get("nan_intervals", NAN_INTERVALS)))


@dataclass
class _Series:
    """One spike rule's state."""

    values: list[float] = field(default_factory=list)  # the baseline: the last normal values
    start: int | None = None  # the first high interval's iteration, while high
    before: int | None = None  # the last normal interval's iteration before it
    high: int = 0  # high intervals in a row (before the spike is confirmed)
    since: int = 0  # iteration lines since the start
    level: float = 0.0
    threshold: float = 0.0
    peak: float = 0.0
    confirmed: bool = False
    unrecovered: bool = False


class AnomalyDetector:
    """Feeds a job's events in log order and returns them with the anomaly events after the lines that
    made them."""

    def __init__(self, settings: AnomalySettings | None = None, state: Mapping[str, Any] | None = None) -> None:
        self.settings = settings or AnomalySettings.from_config()
        state = dict(state or {})
        saved = state.get("series") or {}
        self.series = {
            r.event: _Series(**saved[r.event]) if r.event in saved else _Series() for r in self.settings.rules
        }
        self.checkpoints: list[int] = list(state.get("checkpoints", []))
        self.last_iteration: int | None = state.get("last_iteration")
        self.nan_start: int | None = state.get("nan_start")
        self.nan_since: int = int(state.get("nan_since", 0))
        self.nan_groups: dict[str, Any] | None = state.get("nan_groups")  # the loss_nan event's, while NaN

    @classmethod
    def seeded(cls, settings: AnomalySettings | None, losses: Sequence[float]) -> AnomalyDetector:
        """A detector for a job that resumes a training: the loss rule's baseline holds the training's last
        losses before it, so that a spike in the first intervals after a resume (or a rewind) is judged too."""
        detector = cls(settings)
        spike = next((r for r in detector.settings.rules if r.event == "loss_spike"), None)
        finite = [float(v) for v in losses if is_finite_number(v) and math.isfinite(v)]
        if spike is not None and finite:
            detector.series[spike.event].values = finite[-spike.window :]
        return detector

    def state(self) -> dict[str, Any]:
        return {
            "series": {name: asdict(s) for name, s in self.series.items()},
            "checkpoints": self.checkpoints,
            "last_iteration": self.last_iteration,
            "nan_start": self.nan_start,
            "nan_since": self.nan_since,
            "nan_groups": self.nan_groups,
        }

    def process(self, events: Iterable[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            out.append(event)
            out += self.observe(event)
        return out

    def observe(self, event: Event) -> list[Event]:
        """The anomaly events one event makes (most make none)."""
        g = event.groups
        if event.name in ("checkpoint_saved", "checkpoint_loaded") and _iteration(g.get("iteration")):
            self._remember(g["iteration"])
            return []
        if event.name == "nan" and self.nan_start is None:
            # Megatron's own check (`Unexpected result nan ... iteration N`) stops the run before its line
            found = _ITERATION_IN_LINE.search(event.line)
            start = int(found.group(1)) if found else (self.last_iteration or 0) + 1
            return [self._event("loss_nan", event, {"iteration": start, "rewind_to": self.rewind_to(start, None)})]
        if event.name != "iteration" or not _iteration(g.get("iteration")):
            return []
        iteration = g["iteration"]
        made = self._nan(event, iteration)
        for rule in self.settings.rules:
            value = g.get(rule.series)
            if is_finite_number(value) and math.isfinite(value):
                made += self._spike(rule, self.series[rule.event], event, iteration, float(value))
            elif self.series[rule.event].start is not None:
                self.series[rule.event].since += 1
        self.last_iteration = iteration
        return made

    def suspect_from(self) -> int | None:
        """Where the earliest anomaly a rewind acts on, still going on, began (a loss spike not back under its
        threshold, a NaN loss not finite again), or None: a checkpoint saved since may yet be rewound away."""
        spike = self.series.get("loss_spike")
        starts = [s for s in (spike.start if spike else None, self.nan_start) if s is not None]
        return min(starts) if starts else None

    def rewind_needs(self) -> list[int]:
        """The checkpoints a rewind could still load (what retention keeps): the target of each anomaly going
        on, and the one an anomaly beginning with the next log interval would go back to. A checkpoint between
        them was saved while the loss was wrong, and no later anomaly goes back past the next one's target."""
        targets = [self.rewind_to(s.start, s.before) for s in self.series.values() if s.start is not None]
        if self.nan_start is not None:
            targets.append(self.rewind_to(self.nan_start, (self.nan_groups or {}).get("last_normal")))
        if self.last_iteration is not None:
            targets.append(self.rewind_to(self.last_iteration + 1, self.last_iteration))
        return sorted({t for t in targets if t is not None})

    def rewind_to(self, start: int, before: int | None) -> int | None:
        """The last checkpoint at or before the last normal interval (`before`; else the iteration before
        `start`), `rewind_margin` iterations earlier still; None: none is known (the start of training)."""
        limit = (start - 1 if before is None else before) - self.settings.rewind_margin
        index = bisect.bisect_right(self.checkpoints, limit)
        return self.checkpoints[index - 1] if index else None

    def _remember(self, iteration: int) -> None:
        if iteration not in self.checkpoints:
            bisect.insort(self.checkpoints, iteration)
            del self.checkpoints[:-MAX_CHECKPOINTS]

    def _nan(self, event: Event, iteration: int) -> list[Event]:
        if is_nan_interval(event.groups):
            self.nan_since += 1
            if self.nan_start is not None:
                if self.nan_since != self.settings.nan_intervals or self.nan_groups is None:
                    return []
                # NaN for monitoring.nan_intervals log intervals: what a rewind acts on
                return [self._event("loss_nan_unrecovered", event, {**self.nan_groups, "detected_at": iteration})]
            self.nan_start = iteration
            groups = {
                "iteration": iteration,
                "last_normal": self.last_iteration,
                "rewind_to": self.rewind_to(iteration, self.last_iteration),
            }
            if "nan_iterations" in event.groups:
                groups["nan_iterations"] = event.groups["nan_iterations"]
            self.nan_groups = groups
            return [self._event("loss_nan", event, groups)]
        if self.nan_start is None:
            return []
        groups = {"iteration": iteration, "nan_start": self.nan_start, "intervals": self.nan_since}
        self.nan_start, self.nan_since, self.nan_groups = None, 0, None
        return [self._event("loss_nan_recovered", event, groups)]

    def _spike(self, rule: SpikeRule, s: _Series, event: Event, iteration: int, value: float) -> list[Event]:
        if s.start is None:
            baseline = rule.threshold(s.values)
            if baseline is None or value <= baseline[1]:
                s.values = [*s.values, value][-rule.window :]
                return []
            s.start, s.before, s.high, s.since = iteration, self.last_iteration, 0, 0
            s.level, s.threshold, s.peak, s.confirmed, s.unrecovered = *baseline, value, False, False
        elif value <= s.threshold:
            # the log intervals it lasted: its start and every line since, this one not
            groups = {"iteration": iteration, "spike_start": s.start, "intervals": s.since + 1, "peak": s.peak}
            recovered = s.confirmed
            s.start, s.values = None, [*s.values, value][-rule.window :]
            return [self._event(f"{rule.event}_recovered", event, groups)] if recovered else []
        else:
            s.since += 1
        start = s.start
        s.high += 1
        s.peak = max(s.peak, value)
        made = []
        if not s.confirmed and s.high >= rule.sustain:
            s.confirmed = True
            made.append(self._event(rule.event, event, self._spike_groups(rule, s, start, iteration, value)))
        late = rule.recover_within is not None and s.since >= rule.recover_within
        if s.confirmed and late and not s.unrecovered:
            s.unrecovered = True
            groups = self._spike_groups(rule, s, start, iteration, value)
            made.append(self._event(f"{rule.event}_unrecovered", event, groups))
        return made

    def _spike_groups(self, rule: SpikeRule, s: _Series, start: int, iteration: int, value: float) -> dict[str, Any]:
        return {
            "iteration": start,
            "detected_at": iteration,
            rule.series: value,
            "baseline": _rounded(s.level),
            "threshold": _rounded(s.threshold),
            "peak": s.peak,
            "last_normal": s.before,
            "rewind_to": self.rewind_to(start, s.before),
        }

    @staticmethod
    def _event(name: str, source: Event, groups: dict[str, Any]) -> Event:
        return Event(name, groups, dict(ANOMALY), source.line, source.line_no, source.offset)


def _rounded(value: float) -> float:
    """A computed value as a person reads it (6 significant digits, as Megatron prints a loss)."""
    return float(f"{value:.6g}")


def _iteration(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Divergence:
    """The anomaly a watch stopped its job for (an unrecovered loss spike, or a NaN loss that lasted), and
    what a rewind does about it."""

    anomaly: str  # the event: loss_spike or loss_nan
    start: int  # the iteration where it began
    last_normal: int | None  # the last normal log interval's iteration before it
    detected_at: int  # where the watch acted
    rewind_to: int | None  # the checkpoint to go back to (None: the start of training)

    @classmethod
    def of(cls, anomaly: str, groups: Mapping[str, Any], detected_at: int) -> Divergence:
        return cls(anomaly, int(groups["iteration"]), groups.get("last_normal"), detected_at, groups.get("rewind_to"))

    def skipped(self) -> list[int]:
        """The iterations a rewound run skips: the steps after the last normal log interval, up to where the
        watch acted. Listed from the last normal one itself: Megatron core 0.12-0.16 skip the step after each
        listed iteration, 0.17+ the listed one (docs/megatron-versions.md), so both skip the whole window
        (0.17+ one good step more)."""
        first = self.last_normal if self.last_normal is not None else (self.rewind_to or 0)
        return list(range(max(first, 1), self.detected_at + 1))

    def describe(self) -> str:
        what = "loss spike" if self.anomaly == "loss_spike" else "NaN loss"
        return f"{what} at {self.start}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Divergence:
        return cls(**{k: data.get(k) for k in ("anomaly", "start", "last_normal", "detected_at", "rewind_to")})
