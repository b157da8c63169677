"""`airflow-oellm migrate`: each YAML example of the seed guide, verbatim, becomes a sweep that `validate` and
`plan` accept, with the right keys, and with a note (file:line: key: reason) for everything it does not carry."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_oellm.cli import main as cli
from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.compose import check_file_keys
from airflow_oellm.config.migrate import migrate
from airflow_oellm.config.milestones import plan
from airflow_oellm.config.yamlio import load_yaml
from airflow_oellm.jobscript.render import render_sbatch
from tests.conftest import CONFIG, REPO
from tests.seed_guide import guide_examples
from tests.unit.test_troubleshooting_doc import PLACEHOLDER, fragment

pytestmark = [pytest.mark.cli, pytest.mark.migrate]

HF = "config/monitoring/megatron_checkpoint_hf_conversion.yaml"
MULTI = "config/monitoring/megatron_multi_eval.yaml"
AUTO = "config/platform_auto.yaml"
LUMI = "config/slurm/lumi.yaml"
SCALING = "config/sweep/scaling_experiments.yaml"
PROJECT = "config/project/scaling_study.yaml"
JOBNAME = "config/slurm/base_with_unique_jobname.yaml"
RESUME = "config/monitoring/megatron_auto_resume.yaml"
NOTE_KINDS = ("not needed: ", "not translated: ", "assumed: ", "changed: ")


def test_the_guide_has_the_eight_examples():
    assert sorted(guide_examples()) == sorted([HF, MULTI, AUTO, LUMI, SCALING, PROJECT, JOBNAME, RESUME])


@pytest.fixture
def environment(monkeypatch, site_accounts):
    """What the guide's interpolations read where the sweep is loaded (`${oc.env:OUTPUT_DIR}` has no default)."""
    monkeypatch.setenv("OUTPUT_DIR", "/scratch/out")
    monkeypatch.setenv("OELLM_OUTPUT_DIR", "/scratch/oellm")
    monkeypatch.setenv("OELLM_PLATFORM", "leonardo")  # what `${platform_detect:}` finds, on any machine


class Migrated:
    """A migrated sweep: its file, its YAML data, the notes on stderr, and the validate/plan results."""

    def __init__(self, path: Path, notes: list[str], validate: str, plan: str):
        self.path = path
        self.text = path.read_text()
        self.data = yaml.safe_load(self.text)
        self.notes = notes
        self.validate = validate
        self.plan = plan

    def note(self, text: str) -> str:
        """The one note holding `text` (`file:line: key: reason`, the file named by the end of its path)."""
        found = [n for n in self.notes if text in n]
        assert len(found) == 1, (text, self.notes)
        return found[0]

    def sweep(self):
        return load_sweep(self.path)


@pytest.fixture
def run_migrate(tmp_path, capsys, environment):
    """migrate(seed paths of the guide, written verbatim under tmp/seed/) -> Migrated, after validate and plan."""
    names = itertools.count()

    def run(*seed_paths: str, options: tuple[str, ...] = ()) -> Migrated:
        files = []
        for seed_path in seed_paths:
            file = tmp_path / "seed" / seed_path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(guide_examples()[seed_path])
            files.append(str(file))
        out = tmp_path / "sweeps" / f"migrated{next(names)}.yaml"
        out.parent.mkdir(exist_ok=True)
        capsys.readouterr()
        assert cli(["migrate", *files, "-o", str(out), *options]) == 0
        captured = capsys.readouterr()
        assert captured.out == ""
        notes = captured.err.splitlines()
        assert all(line.startswith("note: ") for line in notes), notes
        for line in notes:  # the same list atop the file, as comments
            assert f"#   {line}\n" in out.read_text()
            assert any(f": {kind}" in line for kind in NOTE_KINDS), line
        assert cli(["validate", str(out)]) == 0, capsys.readouterr().err
        validated = capsys.readouterr().out
        assert cli(["plan", str(out)]) == 0, capsys.readouterr().err
        planned = capsys.readouterr().out
        return Migrated(out, [line.removeprefix("note: ") for line in notes], validated, planned)

    return run


def test_hf_conversion_becomes_the_conversion_and_an_evaluation_of_every_checkpoint(run_migrate):
    m = run_migrate(HF)
    assert m.data["conversion"] == {"model_type": "llama"}
    assert m.data["evaluation"] == {"suites": [{"name": "quick", "when": "every", "tasks": ["perplexity"]}]}
    assert "monitoring" not in m.data and "sweep" not in m.data
    assert "(1 experiments" in m.validate and "1 experiments" in m.plan
    f = "megatron_checkpoint_hf_conversion.yaml"
    m.note(f"{f}:3: defaults[0]: not translated: the seed base config 'megatron_production' is not read")
    m.note(f"{f}:7: log_events[0]: not needed: the built-in event checkpoint_saved matches the same lines")
    m.note(f"{f}:18: log_events[0].actions[0]: not needed: the task logs show every event (LogAction)")
    m.note(f"{f}:26: log_events[0].actions[1].conditions[0]: not needed: a CheckpointSensor waits")
    m.note(f"{f}:30: log_events[0].actions[1].action: changed: `airflow-oellm convert` (conversion.command)")
    m.note(f"{f}:48: log_events[0].actions[2].conditions[0]: not needed: the evaluation task runs after the conv")
    m.note(f"{f}:52: log_events[0].actions[2].action: assumed: tasks [perplexity]")
    m.note(f"{f}: assumed: project.name megatron_checkpoint_hf_conversion (no seed project file")
    cfg = m.sweep().experiments[0].config
    assert cfg.conversion.model_type == "llama" and cfg.conversion.command == ["airflow-oellm", "convert"]
    assert cfg.project.base_output_dir == "/scratch/oellm/megatron_checkpoint_hf_conversion"


BENCHMARK = ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "truthfulqa"]  # `arc` is the two ARC sets


def test_multi_eval_becomes_three_suites_every_interval_final(run_migrate):
    m = run_migrate(MULTI)
    assert m.data["evaluation"]["suites"] == [
        {"name": "quick", "when": "every", "tasks": ["perplexity"]},
        {"name": "full", "when": "interval", "every_iterations": 10000, "tasks": ["perplexity"]},
        {"name": "benchmark", "when": "final", "tasks": BENCHMARK},
    ]
    f = "megatron_multi_eval.yaml"
    m.note(f"{f}:3: defaults[0]: not translated: the seed base config 'megatron_production' is not read")
    m.note(f"{f}:21: log_events[0].actions[0].conditions[0]: not needed: a CheckpointSensor waits")
    m.note(f"{f}:26: log_events[0].actions[0].action.command: not translated: --dataset has no counterpart")
    m.note(f"{f}:43: log_events[0].actions[1].conditions[1]: not needed: a CheckpointSensor waits")
    m.note(f"{f}:50: log_events[0].actions[1].action.overrides: not needed: an evaluation job gets its checkpoint")
    m.note(f"{f}:66: log_events[0].actions[2].action.command: changed: arc is no lm-evaluation-harness task")
    assert len([n for n in m.notes if "assumed: tasks [perplexity]" in n]) == 2  # lines 24 and 46: none named
    # the suites run where the seed's conditions let them: every checkpoint, every 10k, the final one
    experiment = m.sweep().experiments[0]
    evaluations = {e["iteration"]: e["suites"] for e in plan(experiment.resolved).evaluations}
    assert evaluations[1000] == ["quick"] and evaluations[9000] == ["quick"]
    assert evaluations[10000] == ["quick", "full", "benchmark"]  # train_iters 10000: the final one is a 10k one


def test_platform_auto_becomes_the_detected_platform(run_migrate):
    m = run_migrate(AUTO)
    assert m.data["defaults"] == [{"platform": "${platform_detect:}"}, "_self_"]
    m.note("platform_auto.yaml:4: defaults[1]: not needed: a platform file carries its container settings")
    assert not [n for n in m.notes if "platform_auto.yaml:3:" in n]  # `slurm: ${platform_detect:}` is translated
    cfg = m.sweep().experiments[0].config
    assert cfg.platform.name == "leonardo"  # detected (OELLM_PLATFORM) when the sweep is loaded
    assert "platform leonardo" in m.plan


def test_lumi_slurm_file_becomes_platform_lumi_with_its_settings(run_migrate):
    m = run_migrate(LUMI)
    assert m.data["defaults"] == [{"platform": "lumi"}, "_self_"]
    assert m.data["slurm"] == {
        "account": "${oc.env:LUMI_PROJECT}",
        "partition": "standard-g",
        "time": "2:00:00",
        "gpus_per_node": 8,  # `#SBATCH --gpus-per-node=8` and srun.gpus_per_node: 8
        "exclusive": True,
        "extra_directives": ["#SBATCH --hint=nomultithread"],
    }
    assert m.data["platform"]["env"] == {
        "NCCL_SOCKET_IFNAME": "hsn",
        "NCCL_NET_GDR_LEVEL": 3,
        "MIOPEN_USER_DB_PATH": "/tmp/\\${USER}-miopen-cache-\\${SLURM_JOB_ID:-unknown}",
        "MIOPEN_CUSTOM_CACHE_DIR": "/tmp/\\${USER}-miopen-cache-\\${SLURM_JOB_ID:-unknown}",  # ${.MIOPEN_USER_DB_PATH}
    }
    assert m.data["srun"] == {"cpu_bind": "mask_cpu:fe000000000000,fe00000000000000"}
    m.note("lumi.yaml:3: defaults[0]: not needed: every platform here extends platform/base.yaml")
    m.note("lumi.yaml:19: env.MIOPEN_USER_DB_PATH: changed: $USER, $SLURM_JOB_ID now expand in the job's")
    m.note("lumi.yaml:20: env.MIOPEN_CUSTOM_CACHE_DIR: changed: $USER, $SLURM_JOB_ID now expand in the job's")
    experiment = m.sweep().experiments[0]
    cfg = experiment.config
    assert (cfg.platform.name, cfg.slurm.account, cfg.slurm.gpus_per_node) == ("lumi", "project_465000123", 8)
    script = render_sbatch(experiment.materialize())
    assert "#SBATCH --hint=nomultithread" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --account=project_465000123" in script and "#SBATCH --time=02:00:00" in script
    assert 'export MIOPEN_USER_DB_PATH="/tmp/${USER}-miopen-cache-${SLURM_JOB_ID:-unknown}"' in script
    assert '--cpu-bind="mask_cpu:fe000000000000,fe00000000000000"' in script
    assert "1 x 8 GPU x 02:00:00" in m.plan


def test_the_lumi_account_comes_from_lumi_project_where_the_sweep_is_loaded(run_migrate, monkeypatch, capsys):
    m = run_migrate(LUMI)
    monkeypatch.delenv("LUMI_PROJECT")
    assert cli(["validate", str(m.path)]) == 1
    assert "LUMI_PROJECT" in capsys.readouterr().err


def test_scaling_sweep_axes_are_wired_to_real_keys(run_migrate):
    m = run_migrate(SCALING)
    assert m.data["sweep"] == {
        "name_template": "{model}_lr{lr}_gbs{global_batch_size}",
        "base_values": {"backend.args.save_interval": 1000, "backend.args.log_interval": 100},
        "axes": {
            "model": ["50M", "100M", "200M"],
            "backend.args.lr": [0.1, 0.01, 0.001],
            "backend.args.global_batch_size": [128, 256, 512],
        },
    }
    f = "scaling_experiments.yaml"
    m.note(f"{f}:3: axes: assumed: sweep.name_template {{model}}_lr{{lr}}_gbs{{global_batch_size}} (the seed sweep")
    m.note(f"{f}:4: axes.model_size: assumed: means the config group `model`")
    m.note(f"{f}:8: axes.learning_rate: assumed: means the key `backend.args.lr`")
    m.note(f"{f}:12: axes.global_batch_size: assumed: means the key `backend.args.global_batch_size`")
    assert "(27 experiments" in m.validate and "27 experiments" in m.plan and "50M_lr0.1_gbs128" in m.plan
    assert m.data["project"] == {
        "name": "scaling_experiments",
        "base_output_dir": "${oc.env:OELLM_OUTPUT_DIR,/tmp/oellm-runs}/scaling_experiments",
    }


def test_project_file_becomes_the_project(run_migrate):
    m = run_migrate(PROJECT)
    project = {"name": "scaling_study", "base_output_dir": "${oc.env:OUTPUT_DIR}/scaling_experiments"}
    assert m.data == {"project": project}
    m.note("scaling_study.yaml:7: monitoring_state_dir: not needed: state is kept by Airflow and <output>/.oellm/")
    m.note("scaling_study.yaml:8: resume: not needed: a resubmitted job always resumes from the latest checkpoint")
    assert len(m.notes) == 2
    experiment = m.sweep().experiments[0]
    assert experiment.paths.output_dir == "/scratch/out/scaling_experiments/scaling_study"


def test_unique_jobname_slurm_file_is_all_built_in(run_migrate):
    m = run_migrate(JOBNAME)
    assert set(m.data) == {"project"}
    f = "base_with_unique_jobname.yaml"
    m.note(f"{f}:5: script_dir: not needed: paths are fixed: <output>/scripts/<name>-try<N>.sbatch")
    m.note(f"{f}:6: log_dir: not needed: paths are fixed")
    m.note(f"{f}:9: log_path: not needed: paths are fixed")
    m.note(f"{f}:15: sbatch_overrides.job_name: not needed: the job name is the experiment name; the job id is in")
    experiment = m.sweep().experiments[0]
    script = render_sbatch(experiment.materialize())
    assert f"#SBATCH --job-name={experiment.name}\n" in script
    assert f"#SBATCH --output={experiment.paths.log_dir}/{experiment.name}-%j.out" in script


def test_auto_resume_becomes_monitoring_and_the_restart_policy(run_migrate):
    m = run_migrate(RESUME)
    assert m.data["monitoring"] == {
        "poll_interval_seconds": 30,
        "inactivity_threshold_seconds": 1800,
        "output_paths": [
            "${experiment.output_dir}/train.log",
            "${experiment.output_dir}/checkpoints/latest_checkpointed_iteration.txt",
        ],
    }
    assert m.data["restart"] == {"max_attempts": 5}
    f = "megatron_auto_resume.yaml"
    m.note(f"{f}:7: log_path: not needed: paths are fixed")
    m.note(f"{f}:16: state_events[0].state: not needed: the training task recognises how each job ended")
    m.note(f"{f}:26: state_events[0].actions[0].action.reason: not needed: the task log gives the reason")
    m.note(f"{f}:37: state_events[1].actions[0].conditions[0]: not needed: out-of-memory and other fatal failures")
    m.note(f"{f}:40: state_events[1].actions[0].conditions[1]: changed: one limit for every retryable failure")
    experiment = m.sweep().experiments[0]
    assert experiment.config.restart.max_attempts == 5
    assert experiment.config.monitoring.output_paths[0] == f"{experiment.paths.output_dir}/train.log"


def test_all_eight_examples_make_one_sweep(run_migrate):
    m = run_migrate(HF, MULTI, AUTO, LUMI, SCALING, PROJECT, JOBNAME, RESUME)
    assert m.data["defaults"] == [{"platform": "lumi"}, "_self_"]
    assert m.data["project"]["name"] == "scaling_study"
    assert m.data["restart"] == {"max_attempts": 5} and m.data["conversion"] == {"model_type": "llama"}
    assert [s["name"] for s in m.data["evaluation"]["suites"]] == ["quick", "full", "benchmark"]
    assert m.data["slurm"]["account"] == "${oc.env:LUMI_PROJECT}" and len(m.data["sweep"]["axes"]) == 3
    m.note("platform_auto.yaml:3: defaults[0]: not translated: platform ${platform_detect:} conflicts with platform")
    m.note("megatron_multi_eval.yaml:24: log_events[0].actions[0].action: not needed: suite quick runs the same")
    assert "(27 experiments" in m.validate and "platform lumi" in m.plan
    # nothing is missing or said twice: each note of each file alone is among the combined ones
    assert len(m.notes) == len(set(m.notes))


def test_scaling_sweep_and_project_make_27_distinct_trainings(run_migrate):
    m = run_migrate(SCALING, PROJECT)
    sweep = m.sweep()
    assert len(sweep.experiments) == 27
    assert sweep.experiments[0].name == "50M_lr0.1_gbs128"
    assert sweep.experiments[0].paths.output_dir == "/scratch/out/scaling_experiments/50M_lr0.1_gbs128"
    models = {size: load_yaml(CONFIG / "model" / f"{size}.yaml")["backend"]["args"] for size in ("50M", "100M", "200M")}
    seen = set()
    for experiment in sweep.experiments:
        args = experiment.config.backend.args
        size = experiment.parameters["model"]
        assert (args["num_layers"], args["hidden_size"]) == (models[size]["num_layers"], models[size]["hidden_size"])
        assert args["save_interval"] == 1000 and args["log_interval"] == 100
        seen.add((size, args["lr"], args["global_batch_size"]))
    assert seen == set(itertools.product(["50M", "100M", "200M"], [0.1, 0.01, 0.001], [128, 256, 512]))
    assert {(e.config.backend.args["num_layers"]) for e in sweep.experiments} == {8, 12, 16}


def test_name_and_output_dir_options_and_stdout(tmp_path, capsys, environment):
    seed = tmp_path / SCALING
    seed.parent.mkdir(parents=True)
    seed.write_text(guide_examples()[SCALING])
    assert cli(["migrate", str(seed), "--name", "study", "--output-dir", "/scratch/study"]) == 0
    captured = capsys.readouterr()
    data = yaml.safe_load(captured.out)
    assert data["project"] == {"name": "study", "base_output_dir": "/scratch/study"}
    assert "assumed: project.name" not in captured.err and "axes.learning_rate" in captured.err
    assert captured.out.startswith("# Migrated from the seed tool (oellm-autoexp) by `airflow-oellm migrate` from:\n")


def test_cooldowns_at_iterations_become_cooldowns(tmp_path, capsys, environment):
    """The seed repository's multi-cooldown shape: RunAutoexpAction at iterations, with overrides."""
    monitoring = tmp_path / "config/monitoring/cooldowns.yaml"
    monitoring.parent.mkdir(parents=True)
    monitoring.write_text(
        """\
log_events:
  - name: checkpoint_saved_cooldown
    pattern: 'successfully saved checkpoint from iteration\\s+(?P<iteration>\\d+) to (?P<path>\\S+)'
    extract_groups: {checkpoint_iteration: iteration, checkpoint_path: path}
    actions:
      - class_name: EventAction
        conditions:
          - {class_name: MetadataCondition, key: checkpoint_iteration, equals: "10000"}
        action:
          class_name: RunAutoexpAction
          config_path: "{output_dir}/provenance/unresolved_config.yaml"
          overrides:
            - backend.megatron.load={checkpoint_path}
            - backend.megatron.train_iters=0
            - backend.megatron.eval_only=true
      - class_name: EventAction
        conditions:
          - {class_name: MetadataCondition, key: checkpoint_iteration, equals: "50000"}
        action:
          class_name: RunAutoexpAction
          overrides:
            - backend.megatron.load={checkpoint_path}
            - project.base_output_dir={project.base_output_dir}_cooldown_{checkpoint_iteration}_$${oc.timestring:}
            - project.name={project.name}_cooldown_mid
            - backend.megatron.train_iters=75000
            - backend.megatron.lr=0.0001
            - monitoring=megatron_basic
"""
    )
    sweep = tmp_path / "config/sweep/long.yaml"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(
        "class_name: Sweep\naxes: {backend.megatron.lr: [0.001, 0.0003]}\n"
        "base_values: {backend: {megatron: {train_iters: 150000, save_interval: 5000}}}\n"
    )
    out = tmp_path / "sweeps/cooldowns.yaml"
    out.parent.mkdir()
    assert cli(["migrate", str(sweep), str(monitoring), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    data = load_yaml(out)
    assert data["cooldowns"] == [
        {"at": 10000, "train": False},
        {
            "at": 50000,
            "name": "cooldown_50000_\\${oc.timestring:}",
            "overrides": ["backend.args.train_iters=75000", "backend.args.lr=0.0001"],
        },
    ]
    assert data["sweep"]["axes"] == {"backend.args.lr": [0.001, 0.0003]}
    assert "cooldowns.yaml:13: log_events[0].actions[0].action.overrides[0]: not needed: a cooldown loads" in err
    assert "cooldowns.yaml:24: log_events[0].actions[1].action.overrides[2]: not needed: a cooldown gets W&B" in err
    assert "cooldowns.yaml:27: log_events[0].actions[1].action.overrides[5]: not needed: a cooldown never" in err
    assert cli(["validate", str(out)]) == 0 and cli(["plan", str(out)]) == 0
    experiment = load_sweep(out).experiments[0]
    milestones = plan(experiment.runtime_config())
    assert [(c["at"], c["final_iteration"]) for c in milestones.cooldowns] == [(50000, 75000)]
    assert re.search(r"_cooldown_50000_\d{8}-\d{6}$", milestones.cooldowns[0]["name"])


def test_an_axis_that_reaches_no_job_is_reported_not_kept(tmp_path, capsys, environment):
    seed = tmp_path / "sweep.yaml"
    seed.write_text("class_name: Sweep\naxes:\n  flavour: [vanilla, chocolate]\n  learning_rate: [0.1, 0.2]\n")
    assert cli(["migrate", str(seed)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["sweep"]["axes"] == {"backend.args.lr": [0.1, 0.2]}
    assert "sweep.yaml:3: axes.flavour: not translated: no config key or group matches this name" in captured.err


def test_unknown_keys_and_odd_values_become_notes(tmp_path, capsys, environment):
    seed = tmp_path / "slurm.yaml"
    seed.write_text(
        "class_name: Slurm\nsbatch: {nodes: two, qos: normal, gres: 'gpu:4'}\nfancy_feature: true\n"
        "env: {MASTER_ADDR: '$(scontrol show hostnames)', BAD: '$(date)', WORLD: '${oc.muli:${..sbatch.nodes},2}'}\n"
    )
    assert cli(["migrate", str(seed)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["slurm"] == {"qos": "normal", "directives": {"gres": "gpu:4"}}
    err = captured.err
    assert "slurm.yaml:2: sbatch.nodes: not translated: slurm.nodes: expected an integer" in err
    assert "slurm.yaml:3: fancy_feature: not translated: the seed tool's key has no counterpart here" in err
    assert "env.MASTER_ADDR: not needed: the launch sets MASTER_ADDR" in err
    assert "env.BAD: not translated: command substitution is inert here" in err
    assert "env.WORLD: not translated: ${..sbatch.nodes} refers to the seed tool's config layout" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("colour: blue\n", "no seed-tool content recognised"),
        ("", "no seed-tool content recognised"),
    ],
)
def test_unreadable_input_exits_1_with_error_lines(tmp_path, capsys, text, message):
    seed = tmp_path / "seed.yaml"
    seed.write_text(text)
    assert cli(["migrate", str(seed), "-o", str(tmp_path / "out.yaml")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "out.yaml").exists()
    assert captured.err.startswith(f"error: {seed}") and message in captured.err
    assert "Traceback" not in captured.err


def test_bad_options_and_paths_exit_1(tmp_path, capsys):
    seed = tmp_path / "sweep.yaml"
    seed.write_text("class_name: Sweep\naxes: {learning_rate: [0.1, 0.2]}\n")
    assert cli(["migrate", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml: file not found" in capsys.readouterr().err
    assert cli(["migrate", str(seed), "--name", "a b"]) == 1
    assert "error: --name: project name 'a b' is not safe" in capsys.readouterr().err
    assert cli(["migrate", str(seed), "--output-dir", "relative/dir"]) == 1
    assert "error: --output-dir: project.base_output_dir must be an absolute path" in capsys.readouterr().err
    assert cli(["migrate", str(seed), "-o", str(tmp_path / "no" / "such" / "dir" / "out.yaml")]) == 1
    assert "cannot write the sweep: No such file or directory" in capsys.readouterr().err


# random and mutated seed files: migrate writes a sweep our schema accepts, or raises ConfigError

SEED_KEYS = [
    *("class_name", "axes", "base_values", "name_template", "log_events", "state_events", "actions", "conditions"),
    *("action", "command", "overrides", "sbatch", "srun", "env", "sbatch_extra_directives", "sbatch_overrides"),
    *("defaults", "name", "pattern", "pattern_type", "extract_groups", "metadata", "key", "equals", "path"),
    *("max_attempts", "output_paths", "poll_interval_seconds", "base_output_dir", "slurm", "container", "project"),
    *("sweep", "monitoring", "learning_rate", "model_size", "backend.megatron.lr", "cpu_bind", "gpus_per_node"),
    *("account", "time", "job_name", "resume", "state", "mode", "reason", "exclude", "nodes"),
]
SEED_WORDS = [
    *("Sweep", "Project", "Slurm", "SlurmLogMonitor", "EventAction", "RunCommandAction", "RunAutoexpAction"),
    *("LogAction", "FileExistsCondition", "MetadataCondition", "CommandCondition", "MaxAttemptsCondition"),
    *("RestartAction", "50M", "100M", "${platform_detect:}", "lumi", "base", "{output_dir}/x", "${oc.env:X}"),
    *("${.a}", "${..b.c}", "$(date)", "#SBATCH --gpus-per-node=8", "#SBATCH --x", "backend=evaluation"),
    *("python scripts/convert.py --model-type llama", "int('{checkpoint_iteration}') % 100 == 0", "10000"),
    *("{backend.args.train_iters}", "project.base_output_dir=x_$${oc.timestring:}", "backend.megatron.lr=0.1"),
    *("(?P<iteration>\\d+)", "[", "successfully saved checkpoint", "2:00:00"),
]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 100_000), st.floats(), st.sampled_from(SEED_WORDS), st.text(max_size=6)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(SEED_KEYS), inner, max_size=4)
    ),
    max_leaves=25,
)
_edits = st.lists(
    st.tuples(st.integers(0, 4000), st.integers(0, 5), st.sampled_from(["", " ", "-", ":", "{", "[", "\n", "$", "'"])),
    max_size=4,
)
_files = itertools.count()


def _migrates_or_refuses(directory: Path, text: str, stem: str) -> None:
    seed = directory / f"{stem}{next(_files)}.yaml"  # a new file each time: loads are cached by mtime and size
    seed.write_text(text)
    try:
        migration = migrate([str(seed)])
    except ConfigError as exc:
        assert exc.issues and all(issue.file == str(seed) for issue in exc.issues)
        return
    out = directory / f"out{next(_files)}.yaml"
    out.write_text(migration.text())
    written = load_yaml(out)  # its notes stay comments, whatever the seed's text held
    check_file_keys(str(out), {k: v for k, v in written.items() if k != "defaults"})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.dictionaries(st.sampled_from(SEED_KEYS), _values, max_size=6),
    stem=st.sampled_from(["seed", "lumi", "leonardo_x"]),
)
def test_random_seed_files_migrate_or_are_refused(tmp_path_factory, data, stem):
    _migrates_or_refuses(tmp_path_factory.getbasetemp(), yaml.safe_dump(data), stem)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(example=st.sampled_from(sorted(guide_examples())), edits=_edits)
def test_mutated_guide_examples_migrate_or_are_refused(tmp_path_factory, example, edits):
    text = guide_examples()[example]
    for at, length, replacement in edits:
        at %= len(text) + 1
        text = text[:at] + replacement + text[at + length :]
    _migrates_or_refuses(tmp_path_factory.getbasetemp(), text, Path(example).stem)


# the docs

MIGRATE_SOURCE = REPO / "airflow_oellm" / "config" / "migrate.py"


def _note_texts() -> list[str]:
    """Every note reason written in migrate.py (placeholders for the formatted parts)."""
    texts = []
    for node in ast.walk(ast.parse(MIGRATE_SOURCE.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values))
    return [text for text in texts if text.startswith(NOTE_KINDS)]


def test_every_note_is_explained_in_troubleshooting():
    doc = " ".join((REPO / "docs" / "troubleshooting.md").read_text().replace("`", "").split())
    texts = _note_texts()
    assert len(texts) > 40
    missing = [text for text in texts if fragment(text) not in doc]
    assert not missing, missing


def test_the_migration_doc_shows_the_command_and_its_real_output(environment, tmp_path, capsys):
    doc = (REPO / "docs" / "migration.md").read_text()
    command = re.search(r"```bash\n(airflow-oellm migrate [^\n]*)\n```", doc)
    assert command, "docs/migration.md shows no `airflow-oellm migrate` command"
    shown_output = re.search(r"```yaml\n(# Migrated from the seed tool.*?)```", doc, re.S)
    assert shown_output
    seed_root = tmp_path / "seed"
    for path, text in guide_examples().items():
        (seed_root / path).parent.mkdir(parents=True, exist_ok=True)
        (seed_root / path).write_text(text)
    args = command.group(1).split()[1:]
    assert cli([a if a.startswith("-") or "/" not in a else str(seed_root / a) for a in args]) == 0
    captured = capsys.readouterr()
    assert captured.out.replace(f"{seed_root}/", "") == shown_output.group(1)
