"""Scaling-law fits (analysis/scaling.py) on data drawn from known laws, and their refusals."""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.analysis.scaling import (
    AnalysisError,
    Run,
    best_setting,
    compute_frontier,
    fit_loss_law,
    power_law,
)

pytestmark = [pytest.mark.unit, pytest.mark.analysis]
# Hoffmann et al. 2022's fitted law (approach 3): the truth the synthetic runs are drawn from
TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
SIZES = (1e7, 3e7, 1e8, 3e8, 1e9)
TOKENS = (1e9, 3e9, 1e10, 3e10, 1e11)


def true_loss(n: float, d: float) -> float:
    return TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


def drawn(seed: int, noise: float = 0.003) -> list[Run]:
    """A 5 x 5 grid of runs whose log losses carry Gaussian noise."""
    rng = np.random.default_rng(seed)
    return [Run(n, d, true_loss(n, d) * math.exp(rng.normal(0, noise))) for n in SIZES for d in TOKENS]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_loss_law_is_recovered_within_its_bootstrap_intervals(seed):
    law = fit_loss_law(drawn(seed), bootstrap=100, seed=seed)
    for name, value in TRUTH.items():
        low, high = law.interval(name)
        assert low <= value <= high, (name, value, (low, high), getattr(law, name))
        assert low <= getattr(law, name) <= high
    # the exponents, which decide the compute-optimal split, are tight: a few hundredths
    assert abs(law.alpha - TRUTH["alpha"]) < 0.03 and abs(law.beta - TRUTH["beta"]) < 0.05
    # a prediction beyond the grid: a 10 B model on 200 B tokens, within its interval and a percent
    low, high = law.loss_interval(1e10, 2e11)
    assert low <= true_loss(1e10, 2e11) <= high and law.loss(1e10, 2e11) == pytest.approx(true_loss(1e10, 2e11), 0.01)
    summary = law.to_dict()
    assert summary["runs"] == 25 and summary["bootstrap_samples"] == 100 and set(summary["intervals_95"]) == set(TRUTH)


def test_the_compute_optimal_split_follows_the_closed_form_and_spends_the_budget():
    law = fit_loss_law(drawn(1, noise=0.0), bootstrap=20)
    a, b = TRUTH["alpha"], TRUTH["beta"]
    g = (a * TRUTH["A"] / (b * TRUTH["B"])) ** (1 / (a + b))
    for flops in (1e20, 1e22):
        optimal = law.compute_optimal(flops)
        assert 6 * optimal["parameters"] * optimal["tokens"] == pytest.approx(flops)
        assert optimal["parameters"] == pytest.approx(g * (flops / 6) ** (b / (a + b)), rel=0.05)
        low, high = optimal["parameters_interval"]
        assert low <= optimal["parameters"] <= high
        # no other split of the same compute does better
        for factor in (0.5, 2.0):
            n = optimal["parameters"] * factor
            assert law.loss(n, flops / 6 / n) > optimal["loss"]


def test_too_few_sizes_token_counts_or_runs_are_refused_saying_which():
    two_sizes = [Run(n, d, true_loss(n, d)) for n in SIZES[:2] for d in TOKENS]
    with pytest.raises(AnalysisError, match=r"at least 3 model sizes \(N\), there are 2: 1e\+07, 3e\+07$"):
        fit_loss_law(two_sizes)
    one_length = [Run(n, 2e10, true_loss(n, 2e10)) for n in SIZES]
    with pytest.raises(AnalysisError, match=r"3 token counts \(D\), there are 1: 2e\+10; 6 runs .* there are 5"):
        fit_loss_law(one_length)
    with pytest.raises(AnalysisError, match="must be positive and finite"):
        fit_loss_law([*drawn(1), Run(1e8, 1e10, math.nan)])


def test_the_frontier_keeps_the_runs_no_cheaper_run_beats_and_fits_its_power_law():
    points = [(flops, 50 * flops**-0.05) for flops in (1e18, 1e19, 1e20, 1e21)]
    beaten = [(3e19, 50 * 3e19**-0.05 * 1.1), (2e21, 50 * 1e21**-0.05 * 1.01)]  # worse than a cheaper run
    frontier = compute_frontier(points + beaten)
    assert frontier.points == points
    assert frontier.law.exponent == pytest.approx(-0.05) and frontier.law.coefficient == pytest.approx(50)
    assert frontier.law.r_squared == pytest.approx(1.0)
    short = compute_frontier(points[:2])
    assert short.law is None and "3 or more distinct x; there are 2" in short.why_no_law
    with pytest.raises(AnalysisError, match="no run has a loss yet"):
        compute_frontier([])


def test_the_best_value_and_its_flat_range():
    # losses of five learning rates for one size: the best is 3e-3, and 1e-3 is within 1 % of it
    tried = [(3e-4, 3.40), (1e-3, 3.13), (3e-3, 3.11), (1e-2, 3.30), (3e-2, math.nan), (1e-3, 3.20)]
    best = best_setting(tried, "learning rates")
    assert (best.value, best.loss, best.flat, best.tried) == (3e-3, 3.11, (1e-3, 3e-3), 4)
    with pytest.raises(AnalysisError, match="2 or more learning rates with a loss; there are 1"):
        best_setting([(1e-3, 3.1), (3e-3, math.inf)], "learning rates")


def test_the_best_learning_rate_as_a_power_law_of_size():
    sizes = [1e7, 1e8, 1e9]
    law = power_law(sizes, [0.02 * n**-0.25 for n in sizes], "best learning rates")
    assert law.exponent == pytest.approx(-0.25) and law(1e10) == pytest.approx(0.02 * 1e10**-0.25)
    with pytest.raises(AnalysisError, match="best learning rates at 3 or more distinct x; there are 2"):
        power_law(sizes[:2], [1e-3, 2e-3], "best learning rates")
    with pytest.raises(AnalysisError, match="positive, finite"):
        power_law([1e7, 1e8, 0], [1e-3, 1e-3, 1e-3])


finite = st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False)
anything = st.one_of(finite, st.floats(allow_nan=True, allow_infinity=True), st.just(0.0), st.just(-1.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(anything, anything, anything), max_size=8))
def test_any_runs_fit_or_are_refused_with_our_error(rows):
    try:
        law = fit_loss_law([Run(*row) for row in rows], bootstrap=3)
    except AnalysisError:
        return
    assert all(math.isfinite(getattr(law, name)) for name in ("E", "A", "B", "alpha", "beta"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(anything, anything), max_size=10))
def test_any_points_give_a_frontier_and_a_best_value_or_our_error(points):
    with contextlib.suppress(AnalysisError):  # anything else fails the test
        frontier = compute_frontier(points)
        # cheaper to dearer, each better than every cheaper point, every point finite
        assert all(a[0] <= b[0] and b[1] < a[1] for a, b in itertools.pairwise(frontier.points)), frontier
        assert (frontier.law is None) != (frontier.why_no_law is None)
    with contextlib.suppress(AnalysisError):
        best = best_setting(points)
        assert best.flat[0] <= best.value <= best.flat[1] and math.isfinite(best.loss)
    with contextlib.suppress(AnalysisError):
        law = power_law([x for x, _ in points], [y for _, y in points])
        assert math.isfinite(law.coefficient) and math.isfinite(law.exponent)
