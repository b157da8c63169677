"""Scaling laws from a sweep's runs, without Airflow: the fits behind `analysis.json`.

- `fit_loss_law`: L(N, D) = E + A/N^alpha + B/D^beta, Hoffmann et al. 2022's approach 3 as Besiroglu et al.
  2024 replicated it: a Huber loss (delta 1e-3) on log L between the data and log-sum-exp(a - alpha log N,
  b - beta log D, e), minimised with L-BFGS from the best starts of their full grid, and to convergence
  (the original stopped early); 95 % intervals from a bootstrap over the runs (their table 1's method).
- `compute_frontier`: the runs no cheaper run beats, and the power law L = k C^gamma through them.
- `best_setting`: per model size, the best value of a hyperparameter (a learning rate) and how flat the
  optimum is: the values whose loss is within 1 % of the best.
- `power_law`: y = k x^p by least squares in log space (the best learning rate against N).

Every function refuses data it cannot fit with an `AnalysisError` that says what is missing.
scipy's L-BFGS-B is the optimiser (the one both papers used); numpy does the rest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3  # Hoffmann et al.: the Huber loss's delta on log loss
# Besiroglu et al.'s grid of starts (a, b, e are the logs of A, B, E)
START_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
OPTIMISED_STARTS = 20  # the best grid points L-BFGS starts from (the whole grid is evaluated once)
MIN_DISTINCT = 3  # model sizes, and token counts, a fit of L(N, D) needs
MIN_RUNS = 6  # one more than the law's five parameters
BOOTSTRAP_SAMPLES = 200
INTERVAL = (2.5, 97.5)  # percentiles: a 95 % interval
FLAT_WITHIN = 0.01  # a value is as good as the best when its loss is within 1 % of the best


class AnalysisError(ValueError):
    """The data cannot support the fit asked of it; the message says what is missing."""


@dataclass(frozen=True)
class Run:
    """One measurement: N parameters trained on D tokens reached `loss`."""

    parameters: float
    tokens: float
    loss: float


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta, with bootstrap samples of the same five (for intervals)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    runs: int
    objective: float  # the Huber loss at the optimum
    samples: np.ndarray = field(repr=False, compare=False)  # bootstrap fits: rows of (E, A, B, alpha, beta)

    NAMES = ("E", "A", "B", "alpha", "beta")

    def loss(self, parameters: float, tokens: float) -> float:
        return _law(np.array([self.E, self.A, self.B, self.alpha, self.beta]), parameters, tokens).item()

    def loss_interval(self, parameters: float, tokens: float) -> tuple[float, float]:
        return _interval(_law(self.samples, parameters, tokens))

    def interval(self, name: str) -> tuple[float, float]:
        return _interval(self.samples[:, self.NAMES.index(name)])

    def compute_optimal(self, flops: float) -> dict[str, Any]:
        """The N and D that reach the lowest loss for `flops` = 6 N D, with their intervals (Hoffmann et al.'s
        closed form: N = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)))."""
        best = np.array([[self.E, self.A, self.B, self.alpha, self.beta]])
        n, d = _optimal(best, flops)
        ns, ds = _optimal(self.samples, flops)
        return {
            "flops": flops,
            "parameters": n.item(),
            "parameters_interval": _interval(ns),
            "tokens": d.item(),
            "tokens_interval": _interval(ds),
            "loss": self.loss(n.item(), d.item()),
            "loss_interval": self.loss_interval(n.item(), d.item()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": "L(N, D) = E + A / N^alpha + B / D^beta",
            "parameters": {name: getattr(self, name) for name in self.NAMES},
            "intervals_95": {name: list(self.interval(name)) for name in self.NAMES},
            "runs": self.runs,
            "bootstrap_samples": len(self.samples),
            "huber_delta": HUBER_DELTA,
            "objective": self.objective,
        }


def fit_loss_law(runs: Sequence[Run], bootstrap: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> LossLaw:
    """Fit L(N, D) to the runs (see the module's doc); refuses too few runs, sizes or token counts."""
    _check_enough(runs)
    log_n, log_d, log_l = (np.log([getattr(r, k) for r in runs]) for k in ("parameters", "tokens", "loss"))
    # the optimiser works on logs of N and D centred on their means: a and alpha (b and beta) are then
    # nearly independent, where over raw logs of 15-25 they move together and L-BFGS crawls
    centre = np.array([log_n.mean(), log_d.mean()])
    log_n, log_d = log_n - centre[0], log_d - centre[1]
    grid = _centred(np.array(list(itertools.product(*START_GRID.values()))), centre)
    starts = grid[np.argsort(_huber_objective(grid, log_n, log_d, log_l))[:OPTIMISED_STARTS]]
    best, objective = _optimise(starts, log_n, log_d, log_l)
    rng = np.random.default_rng(seed)
    samples = []
    while len(samples) < bootstrap:
        pick = rng.integers(0, len(runs), len(runs))
        if len(set(log_n[pick])) < MIN_DISTINCT or len(set(log_d[pick])) < MIN_DISTINCT:
            continue  # a resample the law cannot be fitted to: drawn again
        theta, _ = _optimise(np.vstack([best, starts[:1]]), log_n[pick], log_d[pick], log_l[pick])
        samples.append(_natural(_centred(theta, -centre)))
    E, A, B, alpha, beta = _natural(_centred(best, -centre))
    return LossLaw(E, A, B, alpha, beta, len(runs), objective, np.array(samples).reshape(-1, 5))


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x^exponent, fitted by least squares on the logs."""

    coefficient: float
    exponent: float
    r_squared: float
    points: int

    def __call__(self, x: float) -> float:
        return self.coefficient * x**self.exponent

    def to_dict(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient, "exponent": self.exponent, "r_squared": self.r_squared,
                "points": self.points}  # fmt: skip


def power_law(xs: Sequence[float], ys: Sequence[float], what: str = "points") -> PowerLaw:
    """The power law through (x, y) pairs; refuses fewer than 3 distinct x or any value not above 0."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.shape != y.shape or (x <= 0).any() or (y <= 0).any() or not np.isfinite([*x, *y]).all():
        raise AnalysisError(f"a power law needs positive, finite {what}")
    if len(set(x.tolist())) < MIN_DISTINCT:
        raise AnalysisError(f"a power law needs {what} at {MIN_DISTINCT} or more distinct x; there are "
                            f"{len(set(x.tolist()))}")  # fmt: skip
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    predicted = intercept + slope * np.log(x)
    spread = ((np.log(y) - np.log(y).mean()) ** 2).sum()
    r_squared = 1.0 - ((np.log(y) - predicted) ** 2).sum() / spread if spread > 1e-12 else 1.0  # else: all equal
    return PowerLaw(math.exp(intercept), float(slope), float(r_squared), len(x))


@dataclass(frozen=True)
class Frontier:
    """The runs on the loss-vs-compute frontier (no run of less or equal compute has a lower loss), and the
    power law through them when there are enough."""

    points: list[tuple[float, float]]  # (flops, loss), by compute
    law: PowerLaw | None
    why_no_law: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "law": self.law.to_dict() if self.law else None,
                "why_no_law": self.why_no_law}  # fmt: skip


def compute_frontier(points: Sequence[tuple[float, float]]) -> Frontier:
    """The frontier of (flops, loss) points and L = k C^gamma through it."""
    measured = [(flops, loss) for flops, loss in points if math.isfinite(flops) and math.isfinite(loss)]
    if not measured:
        raise AnalysisError("no run has a loss yet")
    frontier: list[tuple[float, float]] = []
    for flops, loss in sorted(measured):
        if not frontier or loss < frontier[-1][1]:
            frontier.append((flops, loss))
    try:
        law, why = power_law([p[0] for p in frontier], [p[1] for p in frontier], "frontier runs"), None
    except AnalysisError as exc:
        law, why = None, str(exc)
    return Frontier(frontier, law, why)


@dataclass(frozen=True)
class BestSetting:
    """The value of a hyperparameter with the lowest loss, and the range of values within FLAT_WITHIN of it."""

    value: float
    loss: float
    flat: tuple[float, float]  # the lowest and highest value whose loss is within FLAT_WITHIN of the best
    tried: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "loss": self.loss, "flat_within_1pct": list(self.flat), "tried": self.tried}


def best_setting(tried: Sequence[tuple[float, float]], what: str = "values") -> BestSetting:
    """From (value, loss) pairs of one model size; the lowest loss of each value counts."""
    losses: dict[float, float] = {}
    for value, loss in tried:
        if math.isfinite(value) and math.isfinite(loss):
            losses[value] = min(loss, losses.get(value, math.inf))
    if len(losses) < 2:
        raise AnalysisError(f"a best value needs 2 or more {what} with a loss; there are {len(losses)}")
    value = min(losses, key=lambda v: (losses[v], v))
    flat = [v for v, loss in losses.items() if loss - losses[value] <= FLAT_WITHIN * abs(losses[value])]
    return BestSetting(value, losses[value], (min(flat), max(flat)), len(losses))


def _check_enough(runs: Sequence[Run]) -> None:
    bad = [r for r in runs if not all(math.isfinite(v) and v > 0 for v in (r.parameters, r.tokens, r.loss))]
    if bad:
        raise AnalysisError(f"N, D and the loss must be positive and finite: {bad[0]}")
    sizes, tokens = sorted({r.parameters for r in runs}), sorted({r.tokens for r in runs})
    missing = []
    if len(sizes) < MIN_DISTINCT:
        missing.append(f"{MIN_DISTINCT} model sizes (N), there are {len(sizes)}: {_list(sizes)}")
    if len(tokens) < MIN_DISTINCT:
        missing.append(f"{MIN_DISTINCT} token counts (D), there are {len(tokens)}: {_list(tokens)}")
    if len(runs) < MIN_RUNS:
        missing.append(f"{MIN_RUNS} runs for its 5 parameters, there are {len(runs)}")
    if missing:
        raise AnalysisError("a fit of L(N, D) needs at least " + "; ".join(missing))


def _list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values) or "none"


def _huber_objective(thetas: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    """The Huber loss of each parameter row (a, b, e, alpha, beta), vectorised over rows."""
    a, b, e, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(thetas), len(log_n)))])
    return _huber(logsumexp(terms, axis=0) - log_l).sum(axis=1)


def _huber(r: np.ndarray) -> np.ndarray:
    small = np.abs(r) <= HUBER_DELTA
    return np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _objective_and_gradient(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = logsumexp(terms, axis=0)
    r = lse - log_l
    slope = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # the Huber loss's derivative
    weights = np.exp(terms - lse)  # d lse / d term
    gradient = np.array(
        [
            (slope * weights[0]).sum(),
            (slope * weights[1]).sum(),
            (slope * weights[2]).sum(),
            -(slope * weights[0] * log_n).sum(),
            -(slope * weights[1] * log_d).sum(),
        ]
    )
    return float(_huber(r).sum()), gradient


def _optimise(starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[np.ndarray, float]:
    best, objective = starts[0], math.inf
    for start in starts:
        found = minimize(
            _objective_and_gradient,
            start,
            args=(log_n, log_d, log_l),
            jac=True,
            method="L-BFGS-B",
            # exponents stay non-negative; the loss terms' logs are free
            bounds=[(None, None), (None, None), (None, None), (0.0, 10.0), (0.0, 10.0)],
            options={"maxiter": 10_000, "ftol": 1e-12, "gtol": 1e-10},
        )
        if found.fun < objective:
            best, objective = found.x, float(found.fun)
    return best, objective


def _centred(thetas: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) for logs of N and D less `centre` (the same law): a - alpha * centre[0], ..."""
    moved = np.array(thetas, dtype=float)
    moved[..., 0] -= moved[..., 3] * centre[0]
    moved[..., 1] -= moved[..., 4] * centre[1]
    return moved


def _natural(theta: np.ndarray) -> tuple[float, float, float, float, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return math.exp(e), math.exp(a), math.exp(b), alpha, beta


def _law(params: np.ndarray, parameters: float, tokens: float) -> np.ndarray:
    params = np.atleast_2d(params)
    E, A, B, alpha, beta = (params[:, i] for i in range(5))
    return E + A / parameters**alpha + B / tokens**beta


def _optimal(params: np.ndarray, flops: float) -> tuple[np.ndarray, np.ndarray]:
    _, A, B, alpha, beta = (params[:, i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        n = g * (flops / 6) ** (beta / (alpha + beta))
    return n, (flops / 6) / n


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return (math.nan, math.nan)
    low, high = np.percentile(finite, INTERVAL)
    return float(low), float(high)
