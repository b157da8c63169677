"""What a sweep's analysis is made of, without Airflow or the fitting libraries (the report task and the
DAG file import it): each run's size N, tokens D and compute C per checkpoint (`TrainingScale`), whether a
checkpoint's loss is comparable across runs (`comparable_source`), and the measurements read back from
experiments' reports (`report_measurements`).

Which losses are comparable decides everything (Hägele et al. 2024): a checkpoint in the middle of a
constant or WSD schedule has not decayed its learning rate and is worse than a finished run of the same D,
while a cooldown from it is not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_oellm.megatron.logs import logged_parameters
from airflow_oellm.megatron.size import parameter_count, tokens_trained, training_flops

COOLDOWN, FINAL = "cooldown", "final"  # where a comparable loss comes from
SETTINGS = ("lr", "global_batch_size")  # the hyperparameters whose best value per size is reported
PARAMETERS_AGREE_WITHIN = 0.01  # the log's count and the arguments' may differ by this fraction (rounding)
TRAIN_LOSS, VALIDATION_LOSS = "train_loss", "validation_loss"


def run_settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a sweep analysis compares per model size, as a run's arguments set them."""
    return {key: args[key] for key in SETTINGS if key in args}


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


def report_measurements(reports: Sequence[Mapping[str, Any]]) -> tuple[list[Measurement], str]:
    """The measurements in experiments' reports (their `report.json`: a row per run and checkpoint with
    parameters, tokens, flops and `comparable`), and which loss they carry: the validation loss when every
    comparable row has one, else the train loss (one loss for all: the two differ by more than a fit's noise)."""
    rows = [
        (report, row)
        for report in reports
        if isinstance(report, Mapping) and isinstance(report.get("rows"), list)
        for row in report["rows"]
        if isinstance(row, Mapping)
    ]
    chosen = [row for _, row in rows if row.get("comparable")]
    loss = VALIDATION_LOSS if chosen and all(all_positive(row.get(VALIDATION_LOSS)) for row in chosen) else TRAIN_LOSS
    measurements = []
    for report, row in rows:
        parameters, tokens, flops, value = (row.get(k) for k in ("parameters", "tokens", "flops", loss))
        if not all_positive(parameters, tokens, value):
            continue
        measurements.append(
            Measurement(
                experiment=str(report.get("experiment")),
                parameters=parameters,
                tokens=tokens,
                flops=flops if all_positive(flops) else math.nan,
                loss=value,
                source=row.get("comparable") if row.get("comparable") in (COOLDOWN, FINAL) else None,
                settings={k: v for k, v in _mapping(report.get("settings")).items() if _number(v)},
            )
        )
    return measurements, loss


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def all_positive(*values: Any) -> bool:
    """Every value a finite number above 0."""
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)
