"""Sweep expansion, filters and stable naming."""

from __future__ import annotations

import json

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config import load_sweep
from airflow_oellm.config.naming import NamingError, check_name, render_template
from airflow_oellm.config.sweep import SweepError, expand_sweep
from tests.conftest import CONFIG

pytestmark = pytest.mark.sweep


def values(sweep_def):
    return [p.values for p in expand_sweep(sweep_def)]


def test_axes_are_a_cartesian_product_last_axis_fastest():
    points = expand_sweep({"axes": {"a": [1, 2], "b": ["x", "y", "z"]}})
    assert [(p.index, p.values) for p in points][:4] == [
        (0, {"a": 1, "b": "x"}),
        (1, {"a": 1, "b": "y"}),
        (2, {"a": 1, "b": "z"}),
        (3, {"a": 2, "b": "x"}),
    ]
    assert len(points) == 6


def test_base_values_apply_to_every_point_and_axes_win():
    assert values({"base_values": {"c": 0, "a": 9}, "axes": {"a": [1, 2]}}) == [{"c": 0, "a": 1}, {"c": 0, "a": 2}]


def test_no_axes_gives_one_point():
    assert values({"base_values": {"c": 1}}) == [{"c": 1}]
    assert values({}) == [{}]


def test_groups_list_product_and_defaults():
    sweep = {
        "axes": {"lr": [1, 2]},
        "groups": [
            {
                "type": "list",
                "configs": [
                    {"stage": "stable"},
                    {
                        "type": "list",
                        "defaults": {"decay": True, "stage": "?"},
                        "configs": [{"stage": "d1"}, {"stage": "d2"}],
                    },
                ],
            }
        ],
    }
    assert values(sweep) == [
        {"lr": 1, "stage": "stable"},
        {"lr": 1, "decay": True, "stage": "d1"},
        {"lr": 1, "decay": True, "stage": "d2"},
        {"lr": 2, "stage": "stable"},
        {"lr": 2, "decay": True, "stage": "d1"},
        {"lr": 2, "decay": True, "stage": "d2"},
    ]


def test_top_level_type_list_concatenates_groups():
    sweep = {"type": "list", "groups": [{"type": "product", "axes": {"a": [1, 2]}}, {"b": 3}]}
    assert values(sweep) == [{"a": 1}, {"a": 2}, {"b": 3}]


def test_product_group_with_configs_multiplies_entries():
    sweep = {
        "groups": [
            {"type": "product", "axes": {"a": [1, 2]}, "configs": [{"type": "list", "configs": [{"b": 1}, {"b": 2}]}]}
        ]
    }
    assert values(sweep) == [{"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 2, "b": 1}, {"a": 2, "b": 2}]


def test_filter_keeps_indices_of_the_full_product():
    points = expand_sweep(
        {
            "axes": {"backend.args.lr": [0.1, 0.01], "model": ["50M", "200M"]},
            "filter": "not (lr == 0.1 and model == '200M')",
        }
    )
    assert [(p.index, p.values["model"]) for p in points] == [(0, "50M"), (2, "50M"), (3, "200M")]


def test_filter_sees_index_dotted_names_and_functions():
    points = expand_sweep(
        {"axes": {"backend.args.lr": [1, 2, 3, 4]}, "filter": "index % 2 == 0 and backend.args.lr < max(3, 2)"}
    )
    assert [p.values["backend.args.lr"] for p in points] == [1]


def test_short_names_are_only_offered_when_unique():
    with pytest.raises(SweepError, match="unknown name 'lr'"):
        expand_sweep({"axes": {"a.lr": [1], "b.lr": [2]}, "filter": "lr > 0"})


def test_scaling_study_has_27_experiments_with_seed_names():
    sweep = load_sweep(CONFIG / "sweeps" / "scaling_study.yaml")
    names = [e.name for e in sweep.experiments]
    assert len(names) == 27 == len(set(names))
    assert names[0] == "50M_lr0.1_gbsz128" and names[-1] == "200M_lr0.001_gbsz512"
    assert sweep.varying_keys == ["model", "backend.args.lr", "backend.args.global_batch_size"]
    e = sweep.experiment("100M_lr0.01_gbsz256")
    assert e.config.backend.args["num_layers"] == 12  # model group 100M applied for this point only
    assert sweep.experiment("50M_lr0.01_gbsz256").config.backend.args["num_layers"] == 8
    assert e.paths.output_dir.endswith("/scaling_study/100M_lr0.01_gbsz256")
    assert e.paths.checkpoint_dir == e.paths.output_dir + "/checkpoints"
    assert e.paths.log_path == e.paths.output_dir + "/logs/100M_lr0.01_gbsz256-%j.out"
    assert e.dag_id == "oellm__scaling_study__100M_lr0.01_gbsz256"


def test_names_and_paths_are_pure_functions_of_the_point():
    a = load_sweep(CONFIG / "sweeps" / "scaling_study.yaml")
    # an unrelated override changes no name, index or path
    b = load_sweep(CONFIG / "sweeps" / "scaling_study.yaml", ["slurm.time=999"])
    assert [(e.index, e.name, e.paths) for e in a.experiments] == [(e.index, e.name, e.paths) for e in b.experiments]


def test_bare_axis_names_become_vars(write, project):
    path = write(
        "config/sweeps/v.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: v, base_output_dir: /r}
        backend: {args: {wandb_exp_name: "run-${vars.size}", data_path: "/data/${vars.size}"}}
        sweep:
          axes: {size: [s, m]}
          name_template: "{size}"
        """,
    )
    sweep = load_sweep(path)
    assert [e.config.vars["size"] for e in sweep.experiments] == ["s", "m"]
    assert sweep.experiments[1].config.backend.args["wandb_exp_name"] == "run-m"
    assert sweep.experiments[1].config.backend.args["data_path"] == "/data/m"


def test_template_formats_and_builtin_fields(write, project):
    path = write(
        "config/sweeps/f.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: proj, base_output_dir: /r}
        sweep:
          axes: {backend.args.lr: [0.0001, 0.003]}
          name_template: "${project.name}_{index:03d}_lr{lr:.0e}_{sweep}"
        """,
    )
    assert [e.name for e in load_sweep(path).experiments] == ["proj_000_lr1e-04_f", "proj_001_lr3e-03_f"]


def test_default_template_uses_varying_keys(write, project):
    path = write(
        "config/sweeps/d.yaml",
        "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /r}\n"
        "sweep:\n  base_values: {vars.fixed: 1}\n  axes: {backend.args.lr: [1, 2], vars.seed: [7]}\n",
    )
    assert [e.name for e in load_sweep(path).experiments] == ["p_lr1", "p_lr2"]


@pytest.mark.parametrize("name", ["a b", "a/b", "../x", "-x", "x;y", "é", "x" * 121, ""])
def test_unsafe_names_are_rejected(name):
    with pytest.raises(NamingError):
        check_name(name)


def test_template_literal_braces_and_errors():
    assert render_template("a{{b}}_{x}", {"x": 1}) == "a{b}_1"
    with pytest.raises(NamingError, match="ambiguous"):
        render_template("{lr}", {"a.lr": 1, "b.lr": 2})
    with pytest.raises(NamingError, match="cannot format"):
        render_template("{x:d}", {"x": "text"})


def test_plan_json_interface(capsys):
    assert cli(["plan", str(CONFIG / "sweeps" / "scaling_study.yaml"), "--json", "slurm.time=3600"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 27
    first = rows[0]
    for key in ("name", "dag_id", "output_dir", "parameters", "gpu_hours"):
        assert key in first
    swept = {"model": "50M", "backend.args.lr": 0.1, "backend.args.global_batch_size": 128}
    assert first["parameters"] == {
        **swept,
        "backend.args.save_interval": 1000,
        "backend.args.log_interval": 100,
        "backend.args.train_iters": 5000,
    }
    assert first["time_limit_seconds"] == 3600


def test_plan_table_shows_totals_with_gpus(capsys, site_accounts):
    assert cli(["plan", str(CONFIG / "sweeps" / "scaling_study.yaml"), "platform=lumi", "slurm.nodes=2"]) == 0
    out = capsys.readouterr().out
    assert "27 experiments" in out and "50M_lr0.1_gbsz128" in out
    assert "2 x 8 GPU x 00:30:00" in out
    # 27 experiments x 2 nodes x 8 GPUs x 0.5 h = 216 GPU-hours; x 3 attempts = 648
    assert "total: 27 experiments, 216.0 GPU-hours" in out and "648.0 if every attempt" in out


def test_default_template_leaves_out_keys_some_points_lack(write, project):
    path = write(
        "config/sweeps/d.yaml",
        "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /r}\n"
        "sweep:\n  axes: {backend.args.lr: [1, 2]}\n  groups:\n    - type: list\n"
        "      configs: [{backend.args.seed: 1}, {backend.args.seed: 2, backend.args.clip_grad: 0.5}]\n",
    )
    names = [e.name for e in load_sweep(path).experiments]
    assert names == ["p_lr1_seed1", "p_lr1_seed2", "p_lr2_seed1", "p_lr2_seed2"]
