"""A sweep's analysis from its runs' measurements (analysis/sweep.py): which losses are comparable, and
what is fitted or refused from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from airflow_oellm.analysis.sweep import COOLDOWN, FINAL, Measurement, analyse, comparable
from tests.unit.test_scaling import SIZES, TOKENS, true_loss

pytestmark = [pytest.mark.unit, pytest.mark.analysis]
LRS = (1e-3, 3e-3, 1e-2)


def lr_penalty(lr: float, size: float) -> float:
    """A loss factor whose best learning rate falls with size: 3e-3 at 1e7 down to 1e-3 at 1e9 or so."""
    best = 3e-3 * (size / 1e7) ** -0.25
    return 1 + 0.05 * math.log(lr / best) ** 2


def measured(experiment: str, n: float, d: float, lr: float, source: str | None) -> Measurement:
    loss = true_loss(n, d) * lr_penalty(lr, n)
    return Measurement(experiment, n, d, 6 * n * d, loss, source, {"lr": lr, "global_batch_size": 256})


def test_each_run_gives_its_cooldowns_else_its_final_loss_and_a_run_with_neither_is_named():
    ms = [
        measured("a", 1e8, 1e9, 1e-3, None),  # a stable-phase checkpoint: not comparable
        measured("a", 1e8, 1e9, 1e-3, COOLDOWN),
        measured("a", 1e8, 3e9, 1e-3, COOLDOWN),
        measured("a", 1e8, 1e10, 1e-3, FINAL),  # a cooldown exists: the run's cooldowns are used
        measured("b", 1e8, 1e10, 3e-3, FINAL),
        measured("c", 1e8, 1e9, 1e-2, None),
    ]
    kept, left_out = comparable(ms)
    assert [(m.experiment, m.tokens, m.source) for m in kept] == [("a", 1e9, COOLDOWN), ("a", 3e9, COOLDOWN),
                                                                 ("b", 1e10, FINAL)]  # fmt: skip
    assert list(left_out) == ["c"] and "no cooldown has finished" in left_out["c"]


def test_a_sweep_of_sizes_lengths_and_rates_gives_the_law_the_frontier_and_the_best_rates():
    rng = np.random.default_rng(7)
    ms = []
    for n in SIZES[:3]:
        for lr in LRS:
            for d in TOKENS[:3]:  # each run's cooldowns at three lengths
                m = measured(f"n{n:g}_lr{lr:g}", n, d, lr, COOLDOWN)
                ms.append(Measurement(**{**m.__dict__, "loss": m.loss * math.exp(rng.normal(0, 0.002))}))
    result = analyse(ms, bootstrap=30)
    assert result["losses_used"] == [COOLDOWN] and result["left_out"] == {}
    assert set(result["loss_law"]["parameters"]) == {"E", "A", "B", "alpha", "beta"}
    assert result["frontier"]["points"] and result["frontier"]["law"]["exponent"] < 0
    best = result["best"]["lr"]
    # per size, at its longest cooldown: the rate the penalty favours among the three tried
    for n in SIZES[:3]:
        want = min(LRS, key=lambda lr: lr_penalty(lr, n))
        assert best[f"{n:.4g}"]["value"] == want and best[f"{n:.4g}"]["tokens"] == TOKENS[2], best
    assert result["best_lr_law"]["exponent"] < 0  # larger models want smaller rates
    assert "why_not" in result["best"]["global_batch_size"][f"{SIZES[0]:.4g}"]  # one batch size tried


def test_two_sizes_give_no_law_and_say_why_but_the_rest_is_computed():
    ms = [measured(f"n{n:g}_lr{lr:g}", n, 1e10, lr, FINAL) for n in SIZES[:2] for lr in LRS]
    result = analyse(ms, bootstrap=5)
    assert result["loss_law"]["why_not"].startswith("a fit of L(N, D) needs at least 3 model sizes (N), there are 2")
    assert "3 or more distinct x; there are 2" in result["best_lr_law"]["why_not"]
    assert all("value" in row for row in result["best"]["lr"].values())
    assert analyse([])["frontier"] == {"why_not": "no run has a loss yet"}
