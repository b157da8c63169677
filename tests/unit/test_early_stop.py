"""`sweep.early_stop`: the rule refused when it could stop nothing, and the rung decisions (successive halving,
ASHA-style: a rung decides on the points it has; late points meet the same bar; verdicts are never revised)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.config.early_stop import EarlyStopRule, RulePoint, early_stop_rule
from airflow_oellm.monitor.early_stop import Rung, RungVerdict, metric_at, rungs_of

pytestmark = [pytest.mark.unit, pytest.mark.analysis]
KEYS = ["model", "backend.args.lr"]


def points(models=("50M", "100M"), lrs=(1e-3, 3e-3, 1e-2), train_iters=10_000, eval_interval=1000):
    return [
        RulePoint(f"{m}_lr{lr}", {"model": m, "backend.args.lr": lr}, train_iters, eval_interval)
        for m in models
        for lr in lrs
    ]


def test_a_rule_that_can_stop_points_is_read():
    section = {"at": [2000, 8000], "metric": "validation_loss", "within": "model", "keep": 0.5}
    rule, issues = early_stop_rule(section, points(), KEYS)
    assert issues == [] and rule == EarlyStopRule((2000, 8000), "validation_loss", ("model",), 0.5, None, 60.0)
    assert [rule.kept(n) for n in (1, 2, 3, 9)] == [1, 1, 2, 5]
    assert rule.group_of({"model": "50M", "backend.args.lr": 1e-3}) == "model=50M"
    assert EarlyStopRule.from_dict(rule.to_dict()) == rule


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ({"at": [2000], "keep": 0.5, "within": "modle"}, "sweep.early_stop.within",
         "'modle' is not a key of the sweep (did you mean 'model'?)"),
        ({"at": [2000], "keep": 0.5, "metric": "val_loss"}, "sweep.early_stop.metric",
         "unknown metric 'val_loss' (did you mean 'validation_loss'?)"),
        ({"at": [2000], "keep": 0.5, "kep": 1}, "sweep.early_stop.kep", "unknown key (did you mean 'keep'?)"),
        ({"at": [2000]}, "sweep.early_stop", "give one of keep (a fraction, 0.5) and within_pct"),
        ({"at": [2000], "keep": 0.5, "within_pct": 3}, "sweep.early_stop", "give one of keep"),
        ({"at": [2000], "keep": 1.5}, "sweep.early_stop.keep", "expected a fraction between 0 and 1, got 1.5"),
        ({"at": [8000, 2000], "keep": 0.5}, "sweep.early_stop.at", "rungs must be increasing, each once: [8000, 2000]"),
        ({"at": [0], "keep": 0.5}, "sweep.early_stop.at", "expected iterations above 0"),
        ({"at": "2000", "keep": 0.5}, "sweep.early_stop.at", "expected iterations above 0"),
        ({"at": [2000], "within_pct": -1}, "sweep.early_stop.within_pct", "expected a percentage above 0, got -1"),
        ({"at": [2000], "keep": 0.5, "timeout_minutes": 0}, "sweep.early_stop.timeout_minutes",
         "expected minutes above 0"),
        ([2000], "sweep.early_stop", "expected a mapping (at, metric, within, keep), got list"),
    ],
)  # fmt: skip
def test_a_malformed_rule_names_its_key(section, key, message):
    rule, issues = early_stop_rule(section, points(), KEYS)
    assert rule is None and any(i.key == key and message in i.message for i in issues), issues


@pytest.mark.parametrize(
    ("section", "sweep", "key", "message"),
    [
        # every model has one point: nothing to compare
        ({"at": [2000], "keep": 0.5, "within": "model"}, points(lrs=(1e-3,)), "sweep.early_stop.within",
         "every group has one point (model=50M, model=100M): there is nothing to compare"),
        # 0.9 of 3 rounds up to 3
        ({"at": [2000], "keep": 0.9, "within": "model"}, points(), "sweep.early_stop.keep",
         "keep 0.9 keeps every point of every group (the largest has 3: 3 kept); lower it"),
        ({"at": [2000, 10_000], "keep": 0.5}, points(), "sweep.early_stop.at",
         "rung 10000: no experiment trains past it (the longest trains 10000 iterations)"),
        ({"at": [2500], "keep": 0.5}, points(), "sweep.early_stop.at",
         "rung 2500: 50M_lr0.001, 50M_lr0.003, 50M_lr0.01 ... validate every 1000 iterations"),
        ({"at": [2000], "keep": 0.5}, points(eval_interval=None), "sweep.early_stop.at",
         "validate every 0 iterations (backend.args.eval_interval; 0: never), not at the rung"),
    ],
)  # fmt: skip
def test_a_rule_that_could_never_stop_a_point_is_refused(section, sweep, key, message):
    _, issues = early_stop_rule(section, sweep, KEYS)
    assert any(i.key == key and message in i.message for i in issues), issues


def test_a_train_loss_rule_needs_no_validation_at_the_rung():
    rule, issues = early_stop_rule({"at": [2500], "metric": "train_loss", "within_pct": 3}, points(), KEYS)
    assert issues == [] and rule.within_pct == 3


RULE = EarlyStopRule((2000,), "validation_loss", ("model",), keep=0.5, timeout_minutes=10)


def test_a_rung_waits_for_its_group_then_stops_the_losers():
    rung = Rung(2000, ("a", "b", "c", "d"))
    rung.report("a", 3.1, now=0)
    rung.report("b", 3.4, now=5)
    assert rung.decide(RULE, waiting_for=["c", "d"], now=60) == []  # two still training towards the rung
    rung.report("c", 3.2, now=70)
    rung.report("d", 3.5, now=80)
    verdicts = rung.decide(RULE, waiting_for=[], now=90)
    assert [(v.experiment, v.stop, v.rank) for v in verdicts] == [("a", False, 1), ("c", False, 2), ("b", True, 3),
                                                                  ("d", True, 4)]  # fmt: skip
    assert verdicts[2].reason == "stopped early: rank 3/4 at 2000 (loss 3.4 vs best 3.1)"
    assert rung.decide(RULE, waiting_for=[], now=100) == []  # given once


def test_a_straggler_does_not_hold_the_rung_for_ever_and_meets_the_same_bar_later():
    rung = Rung(2000, ("a", "b", "c", "d"))
    rung.report("a", 3.1, now=0)
    rung.report("b", 3.4, now=5)
    rung.report("c", 3.2, now=6)
    assert rung.decide(RULE, waiting_for=["d"], now=599) == []
    verdicts = rung.decide(RULE, waiting_for=["d"], now=600)  # the timeout: 10 minutes after the first report
    assert [(v.experiment, v.stop) for v in verdicts] == [("a", False), ("c", False), ("b", True)]
    assert rung.bar == 3.2
    rung.report("d", 3.15, now=900)
    late = rung.decide(RULE, waiting_for=[], now=900)
    assert [(v.experiment, v.stop, v.rank, v.of) for v in late] == [("d", False, 2, 4)]
    assert rung.verdicts["c"].stop is False  # never revised, though d ranks above it now


def test_a_point_without_a_value_is_not_ranked_and_within_pct_keeps_the_near_ones():
    rule = EarlyStopRule((2000,), "validation_loss", (), within_pct=3)
    rung = Rung(2000, ("a", "b", "c"))
    rung.report("a", 3.0, now=0)
    rung.report("b", math.inf, now=0)  # diverged
    rung.report("c", 3.2, now=0)
    verdicts = rung.decide(rule, waiting_for=[], now=1)
    assert [(v.experiment, v.stop) for v in verdicts] == [("a", False), ("c", True)]  # 3.2 > 3.0 * 1.03
    restored = Rung.from_dict(rung.to_dict())
    assert restored.to_dict() == rung.to_dict() and restored.verdicts["c"] == rung.verdicts["c"]


def test_rungs_group_the_sweep_and_the_metric_is_read_at_the_rung():
    rule = EarlyStopRule((2000, 8000), "validation_loss", ("model",), keep=0.5)
    found = rungs_of(rule, {p.name: p.parameters for p in points()})
    assert sorted(found) == [(g, r) for g in ("model=100M", "model=50M") for r in (2000, 8000)]
    assert found[("model=50M", 2000)].members == ("50M_lr0.001", "50M_lr0.003", "50M_lr0.01")
    validation = [{"iteration": 1000, "loss": 4.0}, {"iteration": 2000, "loss": 3.5, "split": "test"},
                  {"iteration": 2000, "loss": 3.4}]  # fmt: skip
    assert metric_at(2000, "validation_loss", validation, []) == 3.4
    assert metric_at(3000, "validation_loss", validation, []) is None
    curve = [[1990, 3.9], [2000, 3.8], [2010, 3.7]]
    assert metric_at(2005, "train_loss", [], curve) == 3.8
    assert metric_at(2011, "train_loss", [], curve) is None  # not reached yet


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.one_of(st.none(), st.floats(allow_nan=True)), min_size=1),
    st.sampled_from([0.25, 0.5, 0.75]),
)
def test_a_decided_rung_keeps_its_best_point_and_stops_no_better_one_than_it_keeps(values, keep):
    rule = EarlyStopRule((2000,), "validation_loss", (), keep=keep)
    rung = Rung(2000, tuple("abcdefgh"))
    for experiment, value in values.items():
        rung.report(experiment, value, now=0)
    verdicts = {v.experiment: v for v in rung.decide(rule, waiting_for=[], now=0)}
    ranked = {e: v for e, v in values.items() if v is not None and math.isfinite(v)}
    assert set(verdicts) == set(ranked)
    if ranked:
        kept = [v for v in verdicts.values() if not v.stop]
        assert len(kept) >= rule.kept(len(ranked)) and verdicts[min(ranked, key=ranked.get)].stop is False
        assert all(s.value > k.value for s in verdicts.values() if s.stop for k in kept)
        assert all(isinstance(v, RungVerdict) and v.reason for v in verdicts.values())


def test_the_loader_reads_the_rule_and_refuses_one_that_stops_nothing_naming_the_file():
    from airflow_oellm.config import ConfigError, load_sweep
    from tests.conftest import REPO

    demo = REPO / "examples" / "demo" / "demo.yaml"
    sweep = load_sweep(demo, ["+sweep.early_stop={at: [100], within: model, keep: 0.5}"])
    assert sweep.early_stop == EarlyStopRule((100,), "validation_loss", ("model",), keep=0.5)
    assert load_sweep(demo).early_stop is None
    # the demo validates every 100 iterations: a rung at 150 would never see a validation loss
    with pytest.raises(ConfigError) as refused:
        load_sweep(demo, ["+sweep.early_stop={at: [150], within: model, keep: 0.5}"])
    assert "sweep.early_stop.at: rung 150: tiny_lr0.003, tiny_lr0.01, tiny-wide_lr0.003 ... validate every 100" in str(
        refused.value
    )


def test_rounds_over_a_sweep_report_each_point_once_and_decide_when_the_group_is_in():
    from airflow_oellm.monitor.early_stop import EarlyStopState, PointProgress, early_stop_round, saved_hours

    rule = EarlyStopRule((10, 20), "validation_loss", ("model",), keep=0.5, timeout_minutes=5)
    members = {"a": {"model": "s"}, "b": {"model": "s"}, "c": {"model": "s"}, "d": {"model": "l"}, "e": {"model": "l"}}
    state = EarlyStopState.start(rule, "run1", members)
    assert sorted(state.rungs) == ["model=l @ 10", "model=l @ 20", "model=s @ 10", "model=s @ 20"]

    def at(iteration, losses, training=True):
        return PointProgress(iteration, training, [{"iteration": i, "loss": v} for i, v in losses.items()])

    progress = {"a": at(10, {}), "b": at(12, {10: 3.0}), "c": None, "d": at(15, {10: 2.0}), "e": at(30, {}, False)}
    # a: at 10, its validation may be on its way; b reports; c has not started; e ended at 30 with no value
    # at 10: it is not ranked and holds nothing up, so the large group decides on d alone (kept)
    first = early_stop_round(rule, state, {k: v for k, v in progress.items() if v}, now=0)
    assert [(v.experiment, v.stop, v.of) for v in first] == [("d", False, 1)]
    small, large = state.rungs["model=s @ 10"], state.rungs["model=l @ 10"]
    assert small.reported == {"b": 3.0} and set(large.reported) == {"d", "e"} and small.bar is None
    progress |= {"a": at(11, {10: 3.5}), "c": at(14, {10: 2.5})}
    verdicts = early_stop_round(rule, state, {k: v for k, v in progress.items() if v}, now=60)
    assert sorted((v.experiment, v.rung, v.stop) for v in verdicts) == [("a", 10, True), ("b", 10, False),
                                                                      ("c", 10, False)]  # fmt: skip
    assert early_stop_round(rule, state, progress, now=61) == []  # given once
    saved = EarlyStopState.from_json(state.to_json(), "run1")
    assert saved.to_json() == state.to_json() and EarlyStopState.from_json(state.to_json(), "run2") is None
    assert EarlyStopState.from_json(b"{broken", "run1") is None
    assert [v.experiment for v in saved.verdicts() if v.stop] == ["a"]
    assert saved_hours(100, 10, 3600.0, 8) == (90 / 1000, 8 * 90 / 1000)
    assert saved_hours(100, 100, 3600.0, 8) == (0.0, 0.0) and saved_hours(100, 10, None, 8) == (0.0, 0.0)


def test_the_sweep_dag_gets_an_early_stop_task_beside_its_runs_and_before_its_summary():
    from airflow_oellm.config import load_sweep
    from airflow_oellm.dag_factory import sweep_dag
    from tests.conftest import REPO

    sweep = load_sweep(
        REPO / "examples" / "demo" / "demo.yaml", ["+sweep.early_stop={at: [100], within: model, keep: 0.5}"]
    )
    dag = sweep_dag(sweep)
    task = dag.get_task("early_stop")
    assert task.upstream_task_ids == set() and dag.get_task("summary").upstream_task_ids == {"run", "early_stop"}
    assert EarlyStopRule.from_dict(task.rule) == sweep.early_stop and task.retries == 2
    # the demo polls every 3 s: too often to reschedule (Airflow could fail a poke it sees rescheduled before done)
    assert (task.mode, task.poke_interval) == ("poke", 3)
    every_minute = sweep_dag(load_sweep(REPO / "examples" / "demo" / "demo.yaml", [
        "+sweep.early_stop={at: [100], within: model, keep: 0.5}", "monitoring.poll_interval_seconds=60"]))  # fmt: skip
    assert every_minute.get_task("early_stop").mode == "reschedule"
    first = sweep.experiments[0]
    info = {"name": first.name, "parameters": first.parameters, "output_dir": first.paths.output_dir}
    assert task.experiments[first.dag_id] == {**info, "train_iters": 200, "gpus": 0}  # the dev cluster has no GPUs
    assert task.state_path == f"{first.config.project.base_output_dir}/_analysis/demo/early_stop.json"
    assert "early_stop" not in sweep_dag(load_sweep(REPO / "examples" / "demo" / "demo.yaml")).task_ids


def test_a_point_ranked_to_stop_after_its_training_ended_is_listed_too_late_not_stopped():
    """A rung waits for its whole group: a point that finished meanwhile is ranked, but no hours were saved
    on it, and the task's result says so instead of counting it stopped."""
    from airflow_oellm.config import load_sweep
    from airflow_oellm.dag_factory import sweep_dag
    from airflow_oellm.monitor.early_stop import EarlyStopState, PointProgress, early_stop_round
    from tests.conftest import REPO

    sweep = load_sweep(
        REPO / "examples" / "demo" / "demo.yaml", ["+sweep.early_stop={at: [100], within: model, keep: 0.5}"]
    )
    task = sweep_dag(sweep).get_task("early_stop")
    rule = EarlyStopRule.from_dict(task.rule)
    names = [info["name"] for info in task.experiments.values()]
    state = EarlyStopState.start(rule, "run1", {info["name"]: info["parameters"] for info in task.experiments.values()})
    progress = {
        name: PointProgress(200, False, [{"iteration": 100, "loss": 2.0 + i}]) for i, name in enumerate(names)
    }  # every point finished before the rung decided
    verdicts = early_stop_round(rule, state, progress, now=0)
    losers = {v.experiment: v.reason for v in verdicts if v.stop}
    assert losers, verdicts
    pace = {"summary": {"iteration_ms": 1000.0}, "classification": {"verdict": "success"}}
    outcome = task._outcome(rule, state, {name: pace for name in names})
    assert outcome["stopped"] == {} and outcome["saved"]["hours"] == 0 < outcome["saved"]["sweep_hours"]
    assert outcome["too_late"] == {e: f"{r}; not stopped: its training had already ended" for e, r in losers.items()}
