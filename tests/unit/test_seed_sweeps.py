"""Sweeps written the way the seed guide writes them: nested values, `class_name` tags, and axes that
reach no job (refused by name, before any DAG exists)."""

from __future__ import annotations

import re

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.tracking import wandb_run
from airflow_oellm.config.yamlio import key_line
from airflow_oellm.jobscript.render import render_sbatch
from tests.seed_guide import guide_examples, under

pytestmark = [pytest.mark.sweep, pytest.mark.config]

HEAD = "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /r}\n"


def args_of(sweep):
    return [e.config.backend.args for e in sweep.experiments]


def test_nested_and_dotted_base_values_mean_the_same(write, project):
    axes = "  axes: {backend.args.lr: [0.1, 0.2]}\n"
    nested = write(
        "config/sweeps/nested.yaml",
        HEAD + "sweep:\n" + axes + "  base_values:\n    backend:\n      args: {save_interval: 10, log_interval: 5}\n",
    )
    dotted = write(
        "config/sweeps/dotted.yaml",
        HEAD + "sweep:\n" + axes + "  base_values: {backend.args.save_interval: 10, backend.args.log_interval: 5}\n",
    )
    mixed = write(
        "config/sweeps/mixed.yaml",
        HEAD + "sweep:\n" + axes + "  base_values:\n    backend: {args: {save_interval: 10}}\n"
        "    backend.args.log_interval: 5\n",
    )
    expected = args_of(load_sweep(dotted))
    assert [(a["save_interval"], a["log_interval"], a["lr"]) for a in expected] == [(10, 5, 0.1), (10, 5, 0.2)]
    assert args_of(load_sweep(nested)) == expected
    assert args_of(load_sweep(mixed)) == expected
    # the same names: nested values are the same sweep keys
    assert [e.name for e in load_sweep(nested).experiments] == [e.name for e in load_sweep(dotted).experiments]


def test_nested_axes_and_group_defaults_and_configs(write, project):
    path = write(
        "config/sweeps/g.yaml",
        HEAD
        + """
        sweep:
          name_template: "{stage}_lr{lr}"
          axes:
            backend: {args: {lr: [0.1, 0.2]}}
          groups:
            - type: list
              defaults: {backend: {args: {lr_decay_style: WSD}}}
              configs:
                - {stage: a, backend: {args: {train_iters: 100}}}
                - {stage: b, backend.args.train_iters: 200}
        """.replace("\n        ", "\n"),
    )
    sweep = load_sweep(path)
    got = [
        (e.name, a["lr"], a["train_iters"], a["lr_decay_style"])
        for e, a in zip(sweep.experiments, args_of(sweep), strict=True)
    ]
    assert got == [
        ("a_lr0.1", 0.1, 100, "WSD"),
        ("b_lr0.1", 0.1, 200, "WSD"),
        ("a_lr0.2", 0.2, 100, "WSD"),
        ("b_lr0.2", 0.2, 200, "WSD"),
    ]


def test_a_key_set_nested_and_dotted_is_refused(write, project):
    path = write(
        "config/sweeps/twice.yaml",
        HEAD + "sweep:\n  base_values:\n    backend: {args: {lr: 1}}\n    backend.args.lr: 2\n",
    )
    with pytest.raises(ConfigError, match=r"sweep\.base_values\.backend\.args\.lr: set twice"):
        load_sweep(path)


@pytest.mark.parametrize(
    "form",
    [
        "  base_values:\n    backend:\n      args:\n        train_iters: many\n",
        "  base_values:\n    backend.args.train_iters: many\n",
        "  axes:\n    backend:\n      args:\n        train_iters: [many]\n",
    ],
    ids=["nested", "dotted", "nested-axis"],
)
def test_errors_point_at_the_line_the_value_is_written_on(form, write, project):
    path = write("config/sweeps/bad.yaml", HEAD + "sweep:\n" + form)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    [issue] = err.value.issues
    assert issue.key == "backend.args.train_iters" and issue.file == str(path)
    lines = path.read_text().splitlines()
    assert "train_iters" in lines[issue.line - 1], (issue, lines)


def test_a_mapping_under_a_group_name_sets_keys_and_an_option_name_picks_the_group(write, project):
    # `model` and `backend` are config groups: an option name picks a file, a mapping sets keys inside
    path = write(
        "config/sweeps/m.yaml",
        HEAD + "sweep:\n  axes: {model: [50M, 100M]}\n  base_values:\n    backend: {args: {save_interval: 7}}\n"
        "  name_template: '{model}'\n",
    )
    sweep = load_sweep(path)
    assert [
        (e.name, a["num_layers"], a["save_interval"]) for e, a in zip(sweep.experiments, args_of(sweep), strict=True)
    ] == [
        ("50M", 8, 7),
        ("100M", 12, 7),
    ]
    assert {e.config.backend.name for e in sweep.experiments} == {"megatron"}
    bad = write("config/sweeps/bad.yaml", HEAD + "sweep:\n  axes: {model: [[50M]]}\n")
    with pytest.raises(ConfigError, match=r"'model' is a config group: a sweep value for it is an option name"):
        load_sweep(bad)


def test_seed_class_names_are_accepted_in_their_sections(write, project):
    path = write(
        "config/sweeps/c.yaml",
        "defaults: [{platform: mini}]\n"
        "project: {class_name: Project, name: p, base_output_dir: /r}\n"
        "sweep: {class_name: Sweep, axes: {backend.args.lr: [1, 2]}}\n",
    )
    assert len(load_sweep(path).experiments) == 2
    wrong = write(
        "config/sweeps/w.yaml",
        "defaults: [{platform: mini}]\nproject: {class_name: Sweep, name: p, base_output_dir: /r}\n",
    )
    with pytest.raises(ConfigError, match=r"project\.class_name: only 'Project' is accepted here, got 'Sweep'"):
        load_sweep(wrong)


GUIDE_SWEEP = guide_examples()["config/sweep/scaling_experiments.yaml"]


def guide_sweep_file(write, text=GUIDE_SWEEP):
    """Our sweep file around the guide's sweep block, which is copied in verbatim (indented under `sweep:`)."""
    return write(
        "config/sweeps/scaling_experiments.yaml",
        "defaults: [{platform: devcluster}]\nproject: {name: scaling_study, base_output_dir: /tmp/oellm/scaling}\n"
        + under("sweep", text),
    )


def test_the_guides_scaling_sweep_verbatim_is_refused_naming_the_inert_axes(write, tmp_path, capsys):
    path = guide_sweep_file(write)
    assert cli(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    for axis, meant in [
        ("model_size", "the config group `model` (an axis `model: [50M, 100M, 200M]`)"),
        ("learning_rate", "`backend.args.lr`"),
        ("global_batch_size", "`backend.args.global_batch_size`"),
    ]:
        [line] = [ln for ln in lines if f"sweep.axes.{axis}:" in ln]
        assert f":{key_line(path, f'sweep.axes.{axis}')}: " in line
        assert f"it sets vars.{axis}, which nothing refers to" in line
        assert "27 experiments would run identical jobs" in line
        assert f"did you mean {meant}?" in line
        assert "To repeat a run on purpose" in line
    # the DAG factory and plan refuse it the same way: no DAG, no plan
    assert cli(["plan", str(path)]) == 1
    assert "learning_rate" in capsys.readouterr().err


def test_the_guides_scaling_sweep_wired_plans_27_different_trainings(write, tmp_path, capsys):
    # the guide's block with its axes wired: the size axis picks the model group, the others are referenced
    wired = GUIDE_SWEEP.replace("  model_size:", "  model:")
    path = guide_sweep_file(write, wired)
    text = path.read_text() + (
        "backend:\n  args:\n    lr: ${vars.learning_rate}\n    global_batch_size: ${vars.global_batch_size}\n"
        "    train_iters: 5000\n"
    )
    path.write_text(text)
    assert cli(["validate", str(path)]) == 0
    assert cli(["plan", str(path), "--json"]) == 0
    sweep = load_sweep(path)
    assert len(sweep.experiments) == 27
    scripts = [render_sbatch(e.materialize(), template_dirs=sweep.template_dirs) for e in sweep.experiments]

    def flag(script, name):
        return re.search(rf'--{name} "?([^"\s]+)', script).group(1)

    seen = {
        (flag(s, "num-layers"), flag(s, "hidden-size"), flag(s, "lr"), flag(s, "global-batch-size")) for s in scripts
    }
    assert len(seen) == 27
    assert {s[2] for s in seen} == {"0.1", "0.01", "0.001"}
    assert {s[3] for s in seen} == {"128", "256", "512"}
    assert {s[:2] for s in seen} == {("8", "512"), ("12", "640"), ("16", "896")}
    assert all(flag(s, "save-interval") == "1000" and flag(s, "log-interval") == "100" for s in scripts)
    # each experiment page names what sets it apart: the three axes (and what the model group brings), no more
    for e in sweep.experiments:
        keys = {d["key"] for d in sweep.differences[e.name]}
        assert {"backend.args.lr", "backend.args.global_batch_size", "backend.args.num_layers"} <= keys
        assert not [k for k in keys if k.startswith(("project.", "platform.", "slurm.", "experiment."))], keys
    # 27 trainings, 27 W&B runs
    assert len({wandb_run(e.config).run_id for e in sweep.experiments}) == 27


def test_a_deliberate_repeat_passes_when_its_seed_reaches_the_job(write, project):
    inert = write("config/sweeps/r.yaml", HEAD + "sweep: {axes: {seed: [1, 2]}}\n")
    with pytest.raises(ConfigError, match=r"sweep\.axes\.seed: changes no job: it sets vars\.seed") as err:
        load_sweep(inert)
    assert "To repeat a run on purpose" in str(err.value)
    wired = write(
        "config/sweeps/r2.yaml", HEAD + "backend: {args: {seed: '${vars.seed}'}}\nsweep: {axes: {seed: [1, 2]}}\n"
    )
    assert [e.config.backend.args["seed"] for e in load_sweep(wired).experiments] == [1, 2]


def test_identity_values_alone_do_not_make_trainings_different(write, project):
    # a W&B run name, the output directory and names differ, the training does not
    path = write(
        "config/sweeps/i.yaml",
        "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: '/r/${vars.k}'}\n"
        "backend: {args: {wandb_exp_name: 'run-${vars.k}'}}\nsweep: {axes: {k: [a, b], vars.note: [x]}}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    [issue] = err.value.issues
    assert issue.key == "sweep.axes.k"
    assert "2 experiments would run identical jobs (#0 and #1 differ only in k)" in issue.message
    assert (
        "it sets vars.k, which only names, paths and W&B/TensorBoard identities use "
        "(backend.args.wandb_exp_name, project.base_output_dir)" in issue.message
    )


def test_a_repeat_inside_a_larger_sweep_is_found(write, project):
    # 6 of 9 points collide in pairs (tag x and y change nothing), tag z trains differently
    path = write(
        "config/sweeps/l.yaml",
        HEAD + "sweep:\n  axes: {backend.args.lr: [1, 2, 3]}\n  groups:\n    - type: list\n"
        "      configs: [{tag: x}, {tag: y}, {tag: z, backend.args.seed: 5}]\n",
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    [issue] = err.value.issues
    assert issue.key == "sweep.groups[0].configs[0].tag"
    assert "6 experiments would run identical jobs (#0 and #1 differ only in tag)" in issue.message


def test_the_guides_sweep_file_itself_is_pointed_to_migrate(write, capsys):
    # the seed tool's own file, top-level `class_name: Sweep`: not a sweep file here, and the error says how
    path = write("config/sweeps/scaling_experiments.yaml", GUIDE_SWEEP)
    assert cli(["validate", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in err] == ["class_name", "axes", "base_values"]
    assert all("airflow-oellm migrate FILE" in line for line in err)


def test_flags_left_out_either_way_are_the_same_job(write, project):
    # `false` and `null` both leave a Megatron flag out of the command: no difference a job sees
    path = write("config/sweeps/f.yaml", HEAD + "sweep: {axes: {backend.args.fp16: [false, null]}}\n")
    with pytest.raises(ConfigError, match=r"sweep\.axes\.backend\.args\.fp16: changes no job so 2 experiments"):
        load_sweep(path)
    differ = write("config/sweeps/g.yaml", HEAD + "sweep: {axes: {backend.args.fp16: [true, false]}}\n")
    assert len(load_sweep(differ).experiments) == 2


def test_a_load_time_interpolation_may_give_a_list_or_a_section(write, project):
    # `${vars.modules}` resolves when the sweep loads: only what is left for the run must be a single value
    path = write(
        "config/sweeps/l.yaml",
        HEAD + "vars: {modules: [gcc, cuda]}\nplatform: {modules: '${vars.modules}'}\n",
    )
    assert load_sweep(path).experiments[0].config.platform.modules == ["gcc", "cuda"]
    deferred = write("config/sweeps/d.yaml", HEAD + "platform: {modules: '$${vars.modules}'}\n")
    with pytest.raises(ConfigError, match=r"platform\.modules: expected a list, got a run-time interpolation"):
        load_sweep(deferred)


def test_axes_that_reach_the_job_at_run_time_are_not_inert(write, project):
    # an escaped interpolation resolves when the run starts: the seeds differ then, so the jobs do
    path = write(
        "config/sweeps/r.yaml",
        HEAD + "backend: {args: {seed: '$${vars.seed}'}}\nsweep: {axes: {seed: [1, 2]}}\n",
    )
    sweep = load_sweep(path)
    assert [e.runtime_config()["backend"]["args"]["seed"] for e in sweep.experiments] == [1, 2]


def test_the_same_point_twice_is_named_as_such(write, project):
    path = write(
        "config/sweeps/t.yaml",
        HEAD + "sweep: {name_template: 'p{index}', type: list, groups: [{backend.args.lr: 1}, {backend.args.lr: 1}]}\n",
    )
    with pytest.raises(ConfigError, match=r"sweep: #0 and #1 are the same point: 2 experiments would run identical"):
        load_sweep(path)


def test_iteration_counts_are_ascii_digits(write, project):
    path = write("config/sweeps/u.yaml", HEAD)
    for value in ("²", "٣"):
        with pytest.raises(ConfigError, match=r"backend\.args\.train_iters: expected a whole number of iterations"):
            load_sweep(path, [f"backend.args.train_iters={value}"])
