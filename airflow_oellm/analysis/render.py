"""A sweep analysis (analysis/sweep.analyse's dict, `analysis.json`) as Markdown and plots, without Airflow.

Everything here reads the dict alone, so the sweep DAG's `analysis` task, `airflow-oellm analyze` and a
copy of `analysis.json` give the same report. The plots (PNG and SVG each):
- `loss_vs_compute`: every comparable loss against its FLOPs, by model size, with the frontier and its law;
- `loss_law`: the fitted L(N, D) as contours over N and D, the runs on it, and the compute-optimal line;
- `lr_sensitivity`: per model size, loss against the learning rate at the token count it was compared at.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

PLOT_FORMATS = ("png", "svg")
LOSS_NAMES = {"validation_loss": "validation loss", "train_loss": "train loss"}
SOURCE_NAMES = {"cooldown": "the cooldowns' last checkpoints", "final": "the finished runs' last checkpoints"}


def markdown(analysis: Mapping[str, Any], title: str) -> str:
    """The analysis as a Markdown report: what was used, then each result or why there is none."""
    loss = LOSS_NAMES.get(analysis.get("loss", ""), "loss")
    used = " and ".join(SOURCE_NAMES.get(s, s) for s in analysis.get("losses_used") or []) or "no checkpoint yet"
    lines = [
        f"# Sweep analysis: {title}",
        "",
        f"The {loss} of {used}, {len(analysis.get('measurements') or [])} in all",
    ]
    lines[-1] += " (a stable-phase checkpoint is not comparable with a decayed one; Hägele et al. 2024)."
    left_out = analysis.get("left_out") or {}
    if left_out:
        lines += ["", "Left out:", *[f"- {name}: {why}" for name, why in sorted(left_out.items())]]
    lines += ["", *_best_tables(analysis.get("best") or {})]
    lines += ["", *_law_section(analysis.get("loss_law") or {})]
    lines += ["", *_frontier_section(analysis.get("frontier") or {})]
    lines += ["", "## The best learning rate against N", ""]
    lr_law = analysis.get("best_lr_law") or {}
    if "why_not" in lr_law:
        lines.append(f"Not fitted: {lr_law['why_not']}.")
    else:
        lines.append(
            f"best lr = {lr_law['coefficient']:.4g} x N^{lr_law['exponent']:.3f} (R^2 {lr_law['r_squared']:.3f})"
        )
    return "\n".join(lines) + "\n"


def _best_tables(best: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = []
    for setting, sizes in best.items():
        lines += [f"## Best {setting} per model size", ""]
        reasons = {row.get("why_not") for row in sizes.values()}
        if sizes and None not in reasons and len(reasons) == 1:  # e.g. one value for every size: not swept
            lines += [f"Not compared: {reasons.pop()}.", ""]
            continue
        lines += [
            f"| N | tokens | best {setting} | loss | within 1 % of the best | values tried |",
            "|---|---|---|---|---|---|",
        ]
        for size, row in sizes.items():
            if "why_not" in row:
                lines.append(f"| {size} | {row['tokens']:.4g} | - | - | {row['why_not']} | |")
            else:
                low, high = row["flat_within_1pct"]
                lines.append(
                    f"| {size} | {row['tokens']:.4g} | {row['value']:.4g} | {row['loss']:.4g} | "
                    f"{low:.4g} - {high:.4g} | {row['tried']} |"
                )
        if not sizes:
            lines.append("| - | - | - | - | no comparable loss has this setting | |")
        lines.append("")
    return lines[:-1]


def _law_section(law: Mapping[str, Any]) -> list[str]:
    lines = ["## Scaling law L(N, D) = E + A / N^alpha + B / D^beta", ""]
    if "why_not" in law:
        return [*lines, f"Not fitted: {law['why_not']}."]
    intervals = law["intervals_95"]
    lines += ["| | value | 95 % interval |", "|---|---|---|"]
    for name, value in law["parameters"].items():
        lines.append(f"| {name} | {_number(value)} | {_range(intervals[name])} |")
    lines += ["", f"Huber loss (delta {law['huber_delta']:g}) on log loss over {law['runs']} losses; intervals "
              f"from {law['bootstrap_samples']} bootstrap fits (Hoffmann et al. 2022, approach 3, as Besiroglu et al. "
              "2024).", ""]  # fmt: skip
    if law.get("why_no_prediction"):
        return [*lines, f"No compute-optimal prediction: {law['why_no_prediction']}."]
    lines += ["| compute (FLOPs) | optimal N | optimal D | loss |", "|---|---|---|---|"]
    for p in law.get("compute_optimal") or []:
        lines.append(
            f"| {_number(p['flops'])} | {_number(p['parameters'])} ({_range(p['parameters_interval'])}) | "
            f"{_number(p['tokens'])} ({_range(p['tokens_interval'])}) | {_number(p['loss'])} "
            f"({_range(p['loss_interval'])}) |"
        )
    return lines


def _frontier_section(frontier: Mapping[str, Any]) -> list[str]:
    lines = ["## Loss against compute", ""]
    if "why_not" in frontier:
        return [*lines, f"No frontier: {frontier['why_not']}."]
    points = ", ".join(f"{c:.3g} FLOPs: {loss:.4g}" for c, loss in frontier["points"])
    lines.append(f"The frontier (no cheaper run is better): {points}.")
    law = frontier.get("law")
    if law:
        lines.append(f"L = {law['coefficient']:.4g} x C^{law['exponent']:.4f} (R^2 {law['r_squared']:.3f})")
    else:
        lines.append(f"No power law through it: {frontier.get('why_no_law')}.")
    return lines


def _number(value: Any) -> str:
    """A figure of the analysis (None where the fit gave no finite number)."""
    return f"{value:.4g}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def _range(interval: Any) -> str:
    low, high = interval
    known = all(isinstance(v, int | float) and math.isfinite(v) for v in (low, high))
    return f"{low:.3g} - {high:.3g}" if known else "-"


def plots(analysis: Mapping[str, Any], title: str) -> dict[str, bytes]:
    """`<name>.<format>` -> the file, for each plot the analysis has data for."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    measurements = analysis.get("measurements") or []
    drawn = {}
    if measurements:
        drawn["loss_vs_compute"] = _loss_vs_compute(pyplot, measurements, analysis.get("frontier") or {}, title)
        drawn["lr_sensitivity"] = _lr_sensitivity(pyplot, measurements, (analysis.get("best") or {}).get("lr") or {})
    if "parameters" in (analysis.get("loss_law") or {}):
        drawn["loss_law"] = _loss_law(pyplot, measurements, analysis["loss_law"])
    files = {}
    for name, figure in drawn.items():
        figure.tight_layout()
        for fmt in PLOT_FORMATS:
            buffer = io.BytesIO()
            figure.savefig(buffer, format=fmt, dpi=90, metadata={"Date": None} if fmt == "svg" else None)
            files[f"{name}.{fmt}"] = buffer.getvalue()
        pyplot.close(figure)
    return files


def _sizes(measurements: list[Mapping[str, Any]]) -> list[float]:
    return sorted({m["parameters"] for m in measurements})


def _loss_vs_compute(
    pyplot: Any, measurements: list[Mapping[str, Any]], frontier: Mapping[str, Any], title: str
) -> Any:
    figure, axis = pyplot.subplots(figsize=(6.5, 4.2))
    for size in _sizes(measurements):
        points = [(m["flops"], m["loss"]) for m in measurements if m["parameters"] == size and _finite(m["flops"])]
        axis.scatter([p[0] for p in points], [p[1] for p in points], s=18, label=f"N = {size:.3g}")
    if frontier.get("points"):
        xs, ys = zip(*frontier["points"], strict=True)
        axis.plot(xs, ys, color="black", linewidth=1, label="frontier")
        law = frontier.get("law")
        if law:
            grid = [min(xs) * (max(xs) / min(xs)) ** (i / 40) for i in range(41)]
            axis.plot(grid, [law["coefficient"] * c ** law["exponent"] for c in grid], "k--", linewidth=1,
                      label=f"L ∝ C^{law['exponent']:.3f}")  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("training compute (FLOPs)")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend(fontsize=7)
    return figure


def _lr_sensitivity(pyplot: Any, measurements: list[Mapping[str, Any]], best: Mapping[str, Any]) -> Any:
    figure, axis = pyplot.subplots(figsize=(6.5, 4.2))
    for size in _sizes(measurements):
        row = best.get(f"{size:.4g}") or {}
        tokens = row.get("tokens")
        points = sorted(
            (m["lr"], m["loss"])
            for m in measurements
            if m["parameters"] == size and m["tokens"] == tokens and _finite(m.get("lr"))
        )
        if not points:
            continue
        lines = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"N = {size:.3g}")
        if "value" in row:
            axis.plot([row["value"]], [row["loss"]], marker="*", markersize=14, color=lines[0].get_color())
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("loss")
    axis.set_title("learning rate sensitivity (* best)")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    return figure


def _loss_law(pyplot: Any, measurements: list[Mapping[str, Any]], law: Mapping[str, Any]) -> Any:
    import numpy as np

    p = law["parameters"]
    ns = [m["parameters"] for m in measurements] or [1.0]
    ds = [m["tokens"] for m in measurements] or [1.0]
    n_grid = np.logspace(math.log10(min(ns)) - 0.5, math.log10(max(ns)) + 1, 60)
    d_grid = np.logspace(math.log10(min(ds)) - 0.5, math.log10(max(ds)) + 1, 60)
    n, d = np.meshgrid(n_grid, d_grid)
    loss = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]
    figure, axis = pyplot.subplots(figsize=(6.5, 4.6))
    contours = axis.contour(n, d, loss, levels=12, cmap="viridis", linewidths=0.8)
    axis.clabel(contours, fontsize=6, fmt="%.3g")
    axis.scatter(ns, ds, c="black", s=14, label="runs", zorder=3)
    optimal = [(o["parameters"], o["tokens"]) for o in law.get("compute_optimal") or []]
    if optimal:
        axis.plot([o[0] for o in optimal], [o[1] for o in optimal], "r*-", label="compute-optimal (x10, x100)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("parameters N")
    axis.set_ylabel("tokens D")
    axis.set_title(f"L(N, D): E {p['E']:.3g}, alpha {p['alpha']:.3g}, beta {p['beta']:.3g}")
    axis.legend(fontsize=7)
    return figure


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
