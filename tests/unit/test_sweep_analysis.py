"""A sweep's analysis from its runs' measurements (analysis/sweep.py): which losses are comparable, and
what is fitted or refused from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from airflow_oellm.analysis.measurements import (
    COOLDOWN,
    FINAL,
    Measurement,
    TrainingScale,
    comparable_source,
    report_measurements,
)
from airflow_oellm.analysis.sweep import analyse, comparable
from airflow_oellm.megatron.size import parameter_count
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


TINY = {  # config/model/tiny.yaml with the megatron backend's defaults, as the report reads them
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4, "num_query_groups": 2,
    "group_query_attention": True, "swiglu": True, "position_embedding_type": "rope",
    "untie_embeddings_and_output_weights": True, "seq_length": 64, "global_batch_size": 8, "train_iters": 200,
    "lr_decay_style": "WSD",
}  # fmt: skip


def test_the_logs_parameter_count_is_used_and_checked_against_the_arguments():
    layers = parameter_count(TINY)[0]  # no vocabulary in the arguments: the layers only
    embeddings = 2 * 384 * 64  # the tiny trainer's untied input and output embeddings
    logged = TrainingScale.of(TINY, {"parameters_billions": round((layers + embeddings) / 1e9, 6)})
    # the tiny trainer prints 6 decimals of billions: the count is exact to 500
    assert logged.parameters == pytest.approx(layers + embeddings, abs=500)
    assert (logged.parameters_from, logged.mismatch) == ("log", None)
    # Megatron's exact per-rank counts are summed over tensor and pipeline ranks
    ranks = {"(tensor, pipeline) (0, 0)": 40_000, "(tensor, pipeline) (1, 0)": 40_000}
    assert TrainingScale.of(TINY, {"parameters_by_rank": ranks}).parameters == 80_000
    # fewer parameters in the log than the arguments' layers: said, and the log's count still used
    small = TrainingScale.of(TINY, {"parameters_billions": 0.00001})
    assert small.parameters == 10_000 and "fewer than the arguments' layers" in small.mismatch
    # with the vocabulary known, the two must agree within rounding
    known = {**TINY, "padded_vocab_size": 384}
    assert TrainingScale.of(known, {"parameters_billions": round((layers + embeddings) / 1e9, 6)}).mismatch is None
    assert "the arguments" in TrainingScale.of(known, {"parameters_billions": 0.0002}).mismatch
    # Megatron's 2 decimals: its total is read as +- 5 million
    big = {**known, "num_layers": 24, "hidden_size": 2048, "ffn_hidden_size": 5632, "num_attention_heads": 16}
    count = parameter_count(big)[0]
    assert TrainingScale.of(big, {"parameters_billions": round(count / 1e9, 2)}).mismatch is None
    assert TrainingScale.of(big, {"parameters_billions": round(count / 1e9, 2) + 0.02}).mismatch
    without_log = TrainingScale.of(TINY, {})
    assert (without_log.parameters, without_log.parameters_from) == (layers, "arguments without embeddings")
    assert TrainingScale.of({"hidden_size": 64}, None).parameters is None


def test_tokens_and_flops_count_trained_iterations_and_a_cooldown_continues_its_parent():
    training = TrainingScale.of(TINY, {"parameters_billions": 0.0001})
    assert training.tokens(100) == 100 * 8 * 64
    assert training.tokens(100, skipped=[10, 11, 150]) == 98 * 8 * 64
    at = training.at(100)
    assert at["parameters"] == 100_000 and 6 * 100_000 * at["tokens"] < at["flops"] < 7 * 100_000 * at["tokens"]
    # a cooldown from 100 with twice the batch: its parent's tokens at 100, then its own batches
    cooldown = TrainingScale.of({**TINY, "global_batch_size": 16}, {}, start=(100, training.tokens(100, [10])))
    assert cooldown.tokens(150, skipped=[10, 120]) == 99 * 8 * 64 + 49 * 16 * 64
    assert TrainingScale.of({**TINY, "rampup_batch_size": [4, 4, 100]}, {}).at(10)["tokens"] is None


def test_only_a_decayed_end_is_comparable():
    assert comparable_source(TINY, 200, cooldown=False) == FINAL
    assert comparable_source({k: v for k, v in TINY.items() if k != "lr_decay_style"}, 200, False) == FINAL
    assert comparable_source({**TINY, "lr_decay_style": "constant"}, 200, cooldown=False) is None
    assert comparable_source(TINY, 100, cooldown=False) is None
    assert comparable_source({**TINY, "lr_decay_style": "constant"}, 200, cooldown=True) == COOLDOWN
    assert comparable_source({}, 200, cooldown=True) is None


def report(experiment: str, lr: float, rows: list[dict]) -> dict:
    return {"experiment": experiment, "settings": {"lr": lr, "global_batch_size": 8}, "rows": rows}


def row(run: str, iteration: int, loss: float, validation: float | None, comparable: str | None) -> dict:
    n, d = 1e5, iteration * 512.0
    return {"run": run, "iteration": iteration, "train_loss": loss, "validation_loss": validation,
            "parameters": n, "tokens": d, "flops": 6 * n * d, "comparable": comparable}  # fmt: skip


def test_reports_give_measurements_of_one_loss_for_all():
    reports = [
        report("a", 1e-3, [row("a", 100, 3.0, 3.1, None), row("a_cooldown_100", 200, 2.0, 2.1, COOLDOWN)]),
        report("b", 3e-3, [row("b", 100, 2.9, 3.0, None), row("b", 200, 2.4, 2.5, FINAL)]),
    ]
    measurements, loss = report_measurements(reports)
    assert loss == "validation_loss"
    assert [(m.experiment, m.tokens, m.loss, m.source) for m in measurements] == [
        ("a", 51200.0, 3.1, None), ("a", 102400.0, 2.1, COOLDOWN), ("b", 51200.0, 3.0, None),
        ("b", 102400.0, 2.5, FINAL),
    ]  # fmt: skip
    assert measurements[1].settings == {"lr": 1e-3, "global_batch_size": 8}
    # a comparable row without a validation loss: every measurement uses the train loss
    reports[1]["rows"][1]["validation_loss"] = None
    measurements, loss = report_measurements(reports)
    assert loss == "train_loss" and [m.loss for m in measurements] == [3.0, 2.0, 2.9, 2.4]
    result = analyse(measurements, bootstrap=5, experiments=["a", "b", "c"])
    assert result["left_out"] == {"c": "no checkpoint of it has been measured yet"}


def test_runs_whose_loss_does_not_fall_with_size_give_a_law_but_no_prediction_and_strict_json():
    """The tiny trainer's ladder at a hundred iterations: the larger models are no better. The fit ends at
    alpha about 0, so no compute-optimal split follows; the analysis says so, and has no NaN or infinity."""
    import json

    rng = np.random.default_rng(3)
    ms = [
        Measurement(f"n{n:g}", n, d, 6 * n * d, (2.0 + 400 / d**0.5) * math.exp(rng.normal(0, 0.01)), COOLDOWN, {})
        for n in (1.4e5, 3.8e5, 8.4e5)
        for d in (3e4, 5e4, 8e4)
    ]
    result = analyse(ms, bootstrap=10)
    law = result["loss_law"]
    assert law["parameters"]["alpha"] < 0.05 and law["compute_optimal"] == []
    assert law["why_no_prediction"].startswith("alpha fitted at about 0: over these runs the loss does not fall with N")
    json.dumps(result, allow_nan=False)  # what an XCom and analysis.json take
