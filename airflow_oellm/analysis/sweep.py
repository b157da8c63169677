"""A sweep's analysis from its runs' measurements, without Airflow: what `analysis.json` holds.

Each measurement is one loss of one run at a known size N and token count D. Which losses are comparable
decides everything (Hägele et al. 2024): a checkpoint in the middle of a constant or WSD schedule has not
decayed its learning rate and is worse than a finished run of the same D, while a cooldown from it is not.
So each run contributes the losses it reached with a decayed rate, preferring, in order:
- its cooldowns' final losses (one point per cooldown, at the cooldown's D);
- its own final loss, when it finished its schedule.

Neither for a run: it contributes nothing yet, and the analysis says so. Every part of the analysis is
computed when the data support it, and otherwise carries the reason it is not.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_oellm.analysis.scaling import (
    AnalysisError,
    Run,
    best_setting,
    compute_frontier,
    fit_loss_law,
    power_law,
)
from airflow_oellm.megatron.logs import logged_parameters
from airflow_oellm.megatron.size import parameter_count, tokens_trained, training_flops

COOLDOWN, FINAL = "cooldown", "final"  # where a comparable loss comes from
SETTINGS = ("lr", "global_batch_size")  # the hyperparameters whose best value per size is reported
PARAMETERS_AGREE_WITHIN = 0.01  # the log's count and the arguments' may differ by this fraction (rounding)


@dataclass(frozen=True)
class TrainingScale:
    """A training's size N, and its tokens D and compute C at an iteration, from its arguments and its log.

    N is the log's count when the log gave one (it counts what was built), else the arguments'. Both are
    kept and compared: `mismatch` says how they disagree, beyond the rounding of Megatron's total."""

    args: Mapping[str, Any]
    parameters: float | None
    parameters_from: str | None  # "log", "arguments", "arguments without embeddings" (the vocabulary unknown)
    parameters_computed: float | None
    mismatch: str | None
    start: tuple[int, float] | None = None  # a cooldown: its parent's iteration and tokens it starts from

    @classmethod
    def of(
        cls, args: Mapping[str, Any], summary: Mapping[str, Any] | None, start: tuple[int, float] | None = None
    ) -> TrainingScale:
        summary = summary or {}
        billions = summary.get("parameters_billions")
        logged = logged_parameters(summary.get("parameters_by_rank") or {}, billions)
        counted = parameter_count(args)
        computed, complete = (float(counted[0]), counted[1]) if counted else (None, False)
        mismatch = None
        if logged is not None and computed is not None:
            by_rank = bool(summary.get("parameters_by_rank"))
            tolerance = max(PARAMETERS_AGREE_WITHIN * logged, 0 if by_rank else _rounding(billions) * 1e9)
            if complete and abs(logged - computed) > tolerance:
                mismatch = f"the log counts {logged:.6g} parameters, the arguments {computed:.6g}"
            elif not complete and logged < computed - tolerance:
                mismatch = f"the log counts {logged:.6g} parameters, fewer than the arguments' layers ({computed:.6g})"
        if logged is not None:
            return cls(args, float(logged), "log", computed, mismatch, start)
        where = "arguments" if complete else "arguments without embeddings"
        return cls(args, computed, where if computed is not None else None, computed, None, start)

    def tokens(self, iteration: int, skipped: Iterable[int] = ()) -> float | None:
        """The tokens trained on by `iteration` (the `skipped` iterations train on none)."""
        if self.start is None:
            trained = tokens_trained(self.args, iteration, skipped)
            return None if trained is None else float(trained)
        at, before = self.start
        since = tokens_trained(self.args, iteration, [i for i in skipped if i > at])
        until = tokens_trained(self.args, at)
        return None if since is None or until is None else before + since - until

    def at(self, iteration: int, skipped: Iterable[int] = ()) -> dict[str, float | None]:
        """The row fields of a checkpoint: parameters, tokens, flops."""
        tokens = self.tokens(iteration, skipped)
        flops = None if tokens is None else training_flops(self.args, tokens, self.parameters)
        return {"parameters": self.parameters, "tokens": tokens, "flops": flops}


def comparable_source(args: Mapping[str, Any], iteration: int, cooldown: bool) -> str | None:
    """Whether a checkpoint's loss is comparable across runs, and why: a cooldown's last (COOLDOWN), or a
    training's last when its schedule decays the rate to its end (FINAL); None for any other."""
    final = args.get("train_iters")
    if not isinstance(final, int) or iteration != final:
        return None
    if cooldown:
        return COOLDOWN
    # Megatron's default schedule is linear decay; a constant rate has not decayed at its end
    return FINAL if str(args.get("lr_decay_style", "linear")).lower() != "constant" else None


def _rounding(billions: Any) -> float:
    """Half a unit of the last decimal of Megatron's total in billions: what a count from it may be off by.
    Megatron prints 2 decimals (a trailing zero is lost in the number); a trainer may print more."""
    if not isinstance(billions, int | float):
        return 0.0
    decimals = max(len(f"{float(billions):.9f}".partition(".")[2].rstrip("0")), 2)
    return 0.5 * 10.0**-decimals


@dataclass(frozen=True)
class Measurement:
    """One loss of one run: `source` says why it is comparable (COOLDOWN, FINAL) or None when it is not."""

    experiment: str
    parameters: float
    tokens: float
    flops: float
    loss: float
    source: str | None
    settings: Mapping[str, float]  # lr, global_batch_size, ... as the experiment set them


def comparable(measurements: Sequence[Measurement]) -> tuple[list[Measurement], dict[str, str]]:
    """The measurements each experiment contributes (its cooldowns', else its final one), and for each
    experiment that contributes none, why."""
    by_experiment: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_experiment[m.experiment].append(m)
    kept, left_out = [], {}
    for experiment, ms in by_experiment.items():
        usable = [m for m in ms if m.source is not None and _positive(m.parameters, m.tokens, m.loss)]
        cooled = [m for m in usable if m.source == COOLDOWN]
        chosen = cooled or [m for m in usable if m.source == FINAL]
        if chosen:
            kept += chosen
        else:
            left_out[experiment] = "no cooldown has finished and the run has not finished its schedule"
    return kept, left_out


def analyse(
    measurements: Sequence[Measurement], bootstrap: int = 200, experiments: Sequence[str] = ()
) -> dict[str, Any]:
    """The sweep's analysis: what was used, the L(N, D) fit, the loss-vs-compute frontier, the best value of
    each setting per size and, over 3 or more sizes, the best learning rate as a power law of N.
    `experiments`: the sweep's, so that one with no measurement at all is named too."""
    kept, left_out = comparable(measurements)
    measured = {m.experiment for m in measurements}
    left_out.update({e: "no checkpoint of it has been measured yet" for e in experiments if e not in measured})
    sources = sorted({m.source for m in kept if m.source})
    result: dict[str, Any] = {
        "measurements": [_row(m) for m in kept],
        "losses_used": sources,
        "left_out": left_out,
    }
    try:
        law = fit_loss_law([Run(m.parameters, m.tokens, m.loss) for m in kept], bootstrap=bootstrap)
        result["loss_law"] = law.to_dict()
    except AnalysisError as exc:
        result["loss_law"] = {"why_not": str(exc)}
    try:
        result["frontier"] = compute_frontier([(m.flops, m.loss) for m in kept if _positive(m.flops)]).to_dict()
    except AnalysisError as exc:
        result["frontier"] = {"why_not": str(exc)}
    best: dict[str, dict[str, Any]] = {}
    best_lr: dict[float, float] = {}
    for setting in SETTINGS:
        rows = {}
        for size, tokens, tried in _compared(kept, setting):
            try:
                found = best_setting(tried, f"values of {setting}")
                rows[f"{size:.4g}"] = {"tokens": tokens, **found.to_dict()}
                if setting == "lr":
                    best_lr[size] = found.value
            except AnalysisError as exc:
                rows[f"{size:.4g}"] = {"tokens": tokens, "why_not": str(exc)}
        best[setting] = rows
    result["best"] = best
    try:
        result["best_lr_law"] = power_law(list(best_lr), list(best_lr.values()), "best learning rates").to_dict()
    except AnalysisError as exc:
        result["best_lr_law"] = {"why_not": str(exc)}
    return result


def _compared(kept: Sequence[Measurement], setting: str) -> list[tuple[float, float, list[tuple[float, float]]]]:
    """Per model size, the (value, loss) pairs a best value is chosen from: losses at one token count only (a
    longer run is better at any rate), the largest at which two or more values were tried, else the largest."""
    groups: dict[float, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for m in kept:
        value = m.settings.get(setting)
        if isinstance(value, int | float) and not isinstance(value, bool):
            groups[m.parameters][m.tokens].append((float(value), m.loss))
    compared = []
    for size, by_tokens in sorted(groups.items()):
        varied = [t for t, tried in by_tokens.items() if len({v for v, _ in tried}) >= 2]
        tokens = max(varied or by_tokens)
        compared.append((size, tokens, by_tokens[tokens]))
    return compared


def _row(m: Measurement) -> dict[str, Any]:
    return {
        "experiment": m.experiment,
        "parameters": m.parameters,
        "tokens": m.tokens,
        "flops": m.flops,
        "loss": m.loss,
        "source": m.source,
        **{k: v for k, v in m.settings.items()},
    }


def _positive(*values: float) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


TRAIN_LOSS, VALIDATION_LOSS = "train_loss", "validation_loss"


def report_measurements(reports: Sequence[Mapping[str, Any]]) -> tuple[list[Measurement], str]:
    """The measurements in experiments' reports (their `report.json`: a row per run and checkpoint with
    parameters, tokens, flops and `comparable`), and which loss they carry: the validation loss when every
    comparable row has one, else the train loss (one loss for all: the two differ by more than a fit's noise)."""
    rows = [(report, row) for report in reports for row in report.get("rows") or [] if isinstance(row, Mapping)]
    chosen = [row for _, row in rows if row.get("comparable")]
    loss = VALIDATION_LOSS if chosen and all(_positive(row.get(VALIDATION_LOSS)) for row in chosen) else TRAIN_LOSS
    measurements = []
    for report, row in rows:
        parameters, tokens, flops, value = (row.get(k) for k in ("parameters", "tokens", "flops", loss))
        if not _positive(parameters, tokens, value):
            continue
        measurements.append(
            Measurement(
                experiment=str(report.get("experiment")),
                parameters=parameters,
                tokens=tokens,
                flops=flops if _positive(flops) else math.nan,
                loss=value,
                source=row.get("comparable") if row.get("comparable") in (COOLDOWN, FINAL) else None,
                settings={k: v for k, v in (report.get("settings") or {}).items() if _number(v)},
            )
        )
    return measurements, loss


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
