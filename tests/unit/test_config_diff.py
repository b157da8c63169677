"""How an experiment's config differs from its sweep's base, and what a run's overrides changed
(config/diff.py): on the repository's own sweeps, and as a property of any set of configs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.config.diff import MAX_OTHERS, run_changes, sweep_differences
from airflow_oellm.config.loader import load_sweep
from airflow_oellm.config.run import RunRequest, plan_run
from airflow_oellm.config.sweep import flatten_mapping
from tests.conftest import CONFIG, REPO

pytestmark = pytest.mark.config

WHEN = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)


def test_the_demo_sweeps_experiments_differ_by_their_axes_and_what_the_model_group_sets():
    sweep = load_sweep(str(REPO / "examples" / "demo" / "demo.yaml"), enforce_budget=False)
    differences = sweep.differences
    assert set(differences) == {e.name for e in sweep.experiments}
    rows = {d["key"]: d for d in differences["tiny_lr0.003"]}
    assert rows["backend.args.lr"] == {"key": "backend.args.lr", "value": 0.003, "others": [0.01], "more": 0}
    assert rows["backend.args.hidden_size"]["value"] == 64 and rows["backend.args.hidden_size"]["others"] == [96]
    # paths and names made from the experiment's identity are the same once it is masked: the base
    assert not [k for k in rows if k.startswith("experiment.")]
    assert "monitoring.output_paths" not in rows and "backend.args.save" not in rows
    assert "backend.args.seed" not in rows  # one seed for all: the base


def test_a_key_some_experiments_lack_is_a_difference_marked_unset():
    sweep = load_sweep(str(CONFIG / "sweeps" / "staged_cooldowns.yaml"), enforce_budget=False)
    stable = {d["key"]: d for d in sweep.differences["lr0.001_stable"]}
    decay = {d["key"]: d for d in sweep.differences["lr0.001_decay2k"]}
    assert stable["backend.args.lr_wsd_decay_iters"] == {
        "key": "backend.args.lr_wsd_decay_iters",
        "unset": True,
        "others": [2000, 4000],
        "more": 0,
    }
    assert decay["backend.args.lr_wsd_decay_iters"]["value"] == 2000
    assert decay["backend.args.lr_wsd_decay_iters"]["others"] == [4000]  # unset elsewhere: not a value


def test_others_are_listed_up_to_a_limit_then_counted():
    configs = {f"e{i}": {"experiment": {"name": f"e{i}"}, "backend": {"args": {"seed": i}}} for i in range(9)}
    row = sweep_differences(configs)["e0"][0]
    assert row["key"] == "backend.args.seed" and row["value"] == 0
    assert row["others"] == list(range(1, MAX_OTHERS + 1)) and row["more"] == 8 - MAX_OTHERS


def test_a_run_shows_its_differences_and_what_its_overrides_changed():
    sweep = str(CONFIG / "sweeps" / "cooldowns_and_evals.yaml")
    plain = plan_run(RunRequest(sweep, "lr0.001", WHEN))
    assert plain.changes == [] and [d["key"] for d in plain.differences] == ["backend.args.lr"]
    run = plan_run(
        RunRequest(sweep, "lr0.001", WHEN, overrides=["backend.args.train_iters=120000"], cooldown_points=[50000])
    )
    changed = {c["key"]: c for c in run.changes}
    assert changed["backend.args.train_iters"] == {
        "key": "backend.args.train_iters",
        "experiment": plain.config["backend"]["args"]["train_iters"],
        "run": 120000,
    }
    assert [c["at"] for c in changed["cooldowns"]["run"]] == [50000]  # a list is one value
    assert run.differences == plain.differences  # the sweep's base is the sweep's, whatever the run


def test_run_changes_name_a_key_only_one_side_has():
    assert run_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == [{"key": "a.c", "unset": "experiment", "run": 2}]
    assert run_changes({"a": {"b": 1}}, {"a": {}}) == [
        {"key": "a", "unset": "experiment", "run": {}},  # an empty mapping is a value
        {"key": "a.b", "experiment": 1, "unset": "run"},
    ]
    assert run_changes({"a": 1}, {"a": 1}) == []


leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3))
config = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.dictionaries(st.sampled_from(["x", "y"]), leaf))


@settings(max_examples=200, deadline=None)
@given(st.lists(config, min_size=1, max_size=6))
def test_the_differences_are_exactly_the_keys_not_alike_in_every_config(configs):
    named = {f"e{i}": c for i, c in enumerate(configs)}
    flat = {n: dict(flatten_mapping(c)) for n, c in named.items()}
    keys = {k for f in flat.values() for k in f}

    def alike(key: str) -> bool:
        values = [(type(f[key]), f[key]) if key in f else "unset" for f in flat.values()]
        return all(v == values[0] for v in values)

    differences = sweep_differences(named)
    for name, rows in differences.items():
        assert {r["key"] for r in rows} == {k for k in keys if not alike(k)}
        for r in rows:
            assert ("unset" in r) is (r["key"] not in flat[name])
            assert r.get("value") == flat[name].get(r["key"])
            assert len(r["others"]) + r["more"] + r.get("unset_elsewhere", 0) >= 1  # a difference has another side
            assert r.get("unset_elsewhere", 0) == (0 if "unset" in r else sum(r["key"] not in f for f in flat.values()))
