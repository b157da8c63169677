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
from typing import Any

from airflow_oellm.analysis.measurements import (
    COOLDOWN,
    FINAL,
    SETTINGS,
    Measurement,
    all_positive,
    report_measurements,
)
from airflow_oellm.analysis.scaling import (
    AnalysisError,
    Run,
    best_setting,
    compute_frontier,
    fit_loss_law,
    power_law,
)

FLAT_EXPONENT = 0.05  # an exponent fitted below it: the loss hardly falls with that quantity (fitted ones: 0.3)
PREDICTED_AT = (10, 100)  # compute budgets, in multiples of the largest run's, the law predicts at


def comparable(measurements: Sequence[Measurement]) -> tuple[list[Measurement], dict[str, str]]:
    """The measurements each experiment contributes (its cooldowns', else its final one), and for each
    experiment that contributes none, why."""
    by_experiment: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_experiment[m.experiment].append(m)
    kept, left_out = [], {}
    for experiment, ms in by_experiment.items():
        usable = [m for m in ms if m.source is not None and all_positive(m.parameters, m.tokens, m.loss)]
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
        # what a bigger run would reach: the compute-optimal N and D, and their loss, at 10x and 100x the
        # largest run's compute
        largest = max(
            (m.flops for m in kept if all_positive(m.flops)), default=6 * max(m.parameters * m.tokens for m in kept)
        )
        flat = [name for name in ("alpha", "beta") if getattr(law, name) < FLAT_EXPONENT]
        if flat:  # the runs show no gain from more parameters (or tokens): no split of compute follows
            result["loss_law"]["compute_optimal"] = []
            result["loss_law"]["why_no_prediction"] = (
                f"{' and '.join(flat)} fitted at about 0: over these runs the loss does not fall with "
                f"{' or '.join({'alpha': 'N', 'beta': 'D'}[n] for n in flat)} (too small or too short to show it)"
            )
        else:
            result["loss_law"]["compute_optimal"] = [law.compute_optimal(largest * k) for k in PREDICTED_AT]
    except AnalysisError as exc:
        result["loss_law"] = {"why_not": str(exc)}
    try:
        result["frontier"] = compute_frontier([(m.flops, m.loss) for m in kept if all_positive(m.flops)]).to_dict()
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
    return finite(result)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite number replaced by None: JSON (analysis.json, XCom) has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


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


def analyse_reports(
    reports: Sequence[Mapping[str, Any]], experiments: Sequence[str] = (), bootstrap: int = 200
) -> dict[str, Any]:
    """`analyse` of the measurements in experiments' reports, saying which loss it used."""
    measurements, loss = report_measurements(reports)
    return {"loss": loss, **analyse(measurements, bootstrap, experiments)}
