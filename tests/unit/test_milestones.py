"""A run's plan: which checkpoints are converted and evaluated with which suites, where cooldowns
branch off, and the configs of the side jobs (cooldown training, conversion, evaluation)."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime

import pytest

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.milestones import (
    expected_checkpoints,
    job_config,
    plan,
    resume_own_checkpoint,
    typed,
    with_cooldown_points,
)
from tests.conftest import REPO

pytestmark = pytest.mark.factory
RUN_TIME = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def study() -> dict:
    exp = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    return exp.runtime_config(RUN_TIME)


def test_expected_checkpoints_include_the_end_of_training():
    assert expected_checkpoints(100, 30) == [30, 60, 90, 100]
    assert expected_checkpoints(100, 50) == [50, 100]
    assert expected_checkpoints(100, None) == [100]


def test_suites_per_checkpoint_follow_every_interval_final(study):
    milestones = plan(study)
    assert milestones.checkpoints == list(range(5000, 150001, 5000))
    suites = {e["iteration"]: e["suites"] for e in milestones.evaluations}
    assert suites[5000] == ["quick"]
    assert suites[25000] == ["quick", "full"]
    assert suites[150000] == ["quick", "full", "benchmark"]
    assert all(e["label"] == f"iter {e['iteration']}" for e in milestones.evaluations)


def test_cooldowns_branch_at_checkpoints_with_names_resolved_for_the_run(study):
    cooldowns = plan(study).cooldowns
    # the 10k point only evaluates (its suites join the parent's checkpoint 10000); two train
    assert [(c["at"], c["final_iteration"]) for c in cooldowns] == [(50000, 60000), (100000, 110000)]
    out = study["experiment"]["output_dir"]
    assert cooldowns[0]["output_dir"] == f"{out}_cooldown_50000_20261128-120000"
    assert cooldowns[0]["parent_checkpoint_dir"] == f"{out}/checkpoints"
    assert cooldowns[0]["suites"] == ["quick", "benchmark"]  # 60000 is no multiple of 25000


def test_cooldown_job_loads_the_parents_checkpoint_into_its_own_directory(study):
    job = typed(job_config(study, {"kind": "cooldown", "cooldown": 1}))
    args, parent = job.backend.args, study["experiment"]
    assert args["load"] == parent["checkpoint_dir"] and args["ckpt_step"] == 50000
    assert args["save"] == job.experiment.checkpoint_dir != parent["checkpoint_dir"]
    assert args["override_opt_param_scheduler"] is True
    assert args["lr"] == 3.0e-5 and args["train_iters"] == 60000
    assert job.cooldowns == []  # no recursion
    assert job.experiment.name.startswith(parent["name"] + "_cooldown_50000_")


def test_a_cooldown_resumes_from_its_own_checkpoint_once_it_has_one(study):
    job = typed(job_config(study, {"kind": "cooldown", "cooldown": 1}))
    assert resume_own_checkpoint(job, None) is job
    resumed = resume_own_checkpoint(job, 55000).backend.args
    assert resumed["load"] == job.backend.args["save"] and "ckpt_step" not in resumed
    training = typed(study)  # loads and saves in one place: nothing to change
    assert resume_own_checkpoint(training, 20000) is training


def test_conversion_and_evaluation_jobs(study):
    convert = typed(job_config(study, {"kind": "convert", "iteration": 25000, "cooldown": None}))
    out = study["experiment"]["output_dir"]
    argv = convert.backend.command
    assert argv[:2] == ["airflow-oellm", "convert"]
    assert argv[argv.index("--megatron-checkpoint") + 1] == f"{out}/checkpoints"
    assert argv[argv.index("--output-dir") + 1] == f"{out}/hf/iter_0025000"
    assert convert.slurm.gpus_per_node == 0 and convert.experiment.output_dir.startswith(out + "/jobs/")
    evaluate = typed(job_config(study, {"kind": "evaluate", "iteration": 25000, "suites": ["quick", "full"]}))
    shell, flag, script = evaluate.backend.command
    assert (shell, flag) == ("bash", "-c")
    commands = [shlex.split(c) for c in script.removeprefix("set -e; ").split("; ")]
    assert [c[c.index("--output-file") + 1] for c in commands] == [
        f"{out}/evaluations/iter_0025000/quick.json",
        f"{out}/evaluations/iter_0025000/full.json",
    ]
    with pytest.raises(ConfigError, match="no evaluation suite named 'nope'"):
        job_config(study, {"kind": "evaluate", "iteration": 25000, "suites": ["nope"]})


def test_a_run_can_move_its_cooldown_points(study):
    moved = with_cooldown_points(study, [50000, 75000])
    cooldowns = plan(moved).cooldowns
    assert [c["at"] for c in cooldowns] == [50000, 75000]
    # the new point copies the first training cooldown's settings under its own default name
    assert cooldowns[1]["name"] == study["experiment"]["name"] + "_cooldown_75000"
    assert cooldowns[1]["final_iteration"] == 60000
    with pytest.raises(ConfigError, match="cooldown at 12345 is not a checkpoint"):
        plan(with_cooldown_points(study, [12345]))
    only_eval = {**study, "cooldowns": [c for c in study["cooldowns"] if not c.get("train", True)]}
    with pytest.raises(ConfigError, match="no training cooldown to copy"):
        with_cooldown_points(only_eval, [20000])


def test_a_cooldown_names_only_configured_suites(study):
    broken = {**study, "cooldowns": [{"at": 50000, "suites": ["quik"]}]}
    with pytest.raises(ConfigError, match="no evaluation suite named 'quik' \\(did you mean 'quick'"):
        plan(broken)
