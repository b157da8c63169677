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
from collections.abc import Mapping, Sequence
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

COOLDOWN, FINAL = "cooldown", "final"  # where a comparable loss comes from
SETTINGS = ("lr", "global_batch_size")  # the hyperparameters whose best value per size is reported


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


def analyse(measurements: Sequence[Measurement], bootstrap: int = 200) -> dict[str, Any]:
    """The sweep's analysis: what was used, the L(N, D) fit, the loss-vs-compute frontier, the best value of
    each setting per size and, over 3 or more sizes, the best learning rate as a power law of N."""
    kept, left_out = comparable(measurements)
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
