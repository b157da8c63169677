"""W&B and TensorBoard from the config: one W&B run per training across its attempts, offline where compute
nodes have no internet, the job's environment, links, and settings that would do nothing refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.milestones import job_config, typed
from airflow_oellm.config.tracking import tensorboard_url, wandb_run, wandb_run_id
from airflow_oellm.jobscript.render import render_sbatch
from tests.conftest import CONFIG

pytestmark = pytest.mark.tracking

MINIMAL = CONFIG / "sweeps" / "minimal.yaml"
COOLDOWNS = CONFIG / "sweeps" / "cooldowns_and_evals.yaml"


def test_a_training_logs_to_one_wandb_run_across_attempts_and_a_cooldown_to_its_own():
    sweep = load_sweep(COOLDOWNS, ["tracking.wandb.entity=lab"])
    exp = sweep.experiments[0]
    run = wandb_run(exp.config)
    assert run is not None and not run.offline  # the dev cluster's compute nodes are online
    assert run.project == exp.config.project.name and run.name == exp.name
    assert run.run_id == wandb_run_id(exp.name, exp.paths.output_dir)
    again = load_sweep(COOLDOWNS, ["tracking.wandb.entity=lab"]).experiments[0]
    assert wandb_run(again.config) == run  # every attempt renders the same identity
    assert run.env() == {
        "WANDB_RUN_ID": run.run_id,
        "WANDB_RESUME": "allow",
        "WANDB_MODE": "online",
        "WANDB_ENTITY": "lab",
    }
    assert run.url == f"https://wandb.ai/lab/{run.project}/runs/{run.run_id}"
    assert run.offline_dir == f"{exp.paths.output_dir}/wandb/wandb"

    cooldown = typed(job_config(exp.runtime_config(), {"kind": "cooldown", "cooldown": 0}))
    branch = wandb_run(cooldown)
    assert branch is not None and branch.run_id != run.run_id and branch.name == cooldown.experiment.name
    assert branch.save_dir == f"{cooldown.experiment.output_dir}/wandb"
    for kind in ("convert", "evaluate"):
        side = exp.runtime_config()
        job = {"kind": kind, "iteration": 100, "cooldown": None, "suites": ["quick"]}
        assert wandb_run(typed(job_config(side, job))) is None


def test_compute_nodes_without_internet_run_wandb_offline_and_the_script_says_so(site_accounts):
    juwels = load_sweep(MINIMAL, ["platform=juwels", "tracking.wandb.host=https://wandb.example.org/"])
    cfg = juwels.experiments[0].config
    run = wandb_run(cfg)
    assert run is not None and run.offline and run.synced
    script = render_sbatch(cfg, template_dirs=juwels.template_dirs)
    assert 'export WANDB_MODE="offline"\n' in script
    assert f'export WANDB_RUN_ID="{run.run_id}"\n' in script and 'export WANDB_RESUME="allow"\n' in script
    assert 'export WANDB_BASE_URL="https://wandb.example.org"\n' in script
    assert run.url is None  # no entity: its address is unknown
    online = load_sweep(MINIMAL, ["platform=juwels", "tracking.wandb.mode=online"]).experiments[0].config
    assert not wandb_run(online).offline
    lumi = load_sweep(MINIMAL, ["platform=lumi"]).experiments[0].config
    assert not wandb_run(lumi).offline
    assert wandb_run(
        load_sweep(MINIMAL, ["platform=lumi", "tracking.wandb.mode=offline"]).experiments[0].config
    ).offline


def test_without_a_wandb_project_nothing_logs_to_wandb():
    cfg = load_sweep(MINIMAL, ["backend.args.wandb_project=null"]).experiments[0].config
    assert wandb_run(cfg) is None
    assert "WANDB_" not in render_sbatch(cfg)


def test_the_tensorboard_link_fills_in_the_log_directory():
    sweep = load_sweep(MINIMAL, ["tracking.tensorboard.url=https://tb.example.org/?logdir={logdir}"])
    exp = sweep.experiments[0]
    assert tensorboard_url(exp.config) == (
        "https://tb.example.org/?logdir=" + f"{exp.paths.output_dir}/tensorboard".replace("/", "%2F")
    )
    assert tensorboard_url(load_sweep(MINIMAL).experiments[0].config) is None


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        (
            ["backend.args.wandb_project=null", "tracking.wandb.entity=lab"],
            "tracking.wandb.entity",
            "is set but nothing logs to W&B: set backend.args.wandb_project",
        ),
        (["tracking.wandb.sync=false"], "tracking.wandb.sync", "is set but the runs are online"),
        (
            ["backend.args.tensorboard_dir=null", "tracking.tensorboard.url=https://tb/?d={logdir}"],
            "tracking.tensorboard.url",
            "is set but nothing writes TensorBoard logs",
        ),
        (["tracking.tensorboard.url=https://tb/"], "tracking.tensorboard.url", "has no {logdir}"),
        (["+platform.env.WANDB_MODE=offline"], "platform.env.WANDB_MODE", "is set for W&B runs by tracking.wandb"),
    ],
)
def test_tracking_settings_that_would_do_nothing_are_refused_by_name(overrides, key, reason):
    with pytest.raises(ConfigError) as caught:
        load_sweep(MINIMAL, overrides)
    issue = next(i for i in caught.value.issues if i.key == key)
    assert reason in issue.message


@given(st.text(max_size=300), st.text(min_size=1, max_size=300))
def test_a_wandb_run_id_is_always_one_wandb_accepts(name, output_dir):
    run_id = wandb_run_id(name, output_dir)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id)
    assert run_id == wandb_run_id(name, output_dir + "/")  # the directory, not its spelling
