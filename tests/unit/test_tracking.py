"""W&B and TensorBoard from the config: one W&B run per training across its attempts, offline where compute
nodes have no internet, the job's environment, links, and settings that would do nothing refused."""

from __future__ import annotations

import concurrent.futures
import re
import shlex
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.milestones import job_config, typed
from airflow_oellm.config.tracking import tensorboard_url, wandb_run, wandb_run_id
from airflow_oellm.dag_factory import experiment_dag
from airflow_oellm.hooks.transport import LocalShell
from airflow_oellm.jobscript.render import render_sbatch
from airflow_oellm.slurm.offline_runs import OfflineRunSync, parse_sync
from airflow_oellm.slurm.operations import run_sync, sync_offline_runs
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


@pytest.mark.factory
def test_offline_runs_are_pushed_after_the_training_each_branch_and_each_cooldown_never_before_a_training(
    site_accounts,
):
    sweep = load_sweep(COOLDOWNS, ["platform=juwels"])
    dag = experiment_dag(sweep, sweep.experiments[0])
    syncs = {t for t in dag.task_ids if t.endswith("sync_wandb")}
    assert syncs == {"sync_wandb", "checkpoint.sync_wandb", "cooldown.sync_wandb"}
    # after the job whose runs it pushes (and prepare, whose config it reads)
    assert dag.get_task("sync_wandb").upstream_task_ids == {"prepare", "train"}
    assert dag.get_task("checkpoint.sync_wandb").upstream_task_ids - {"prepare", "cooldown_plan"} == {
        "checkpoint.evaluate"
    }
    assert dag.get_task("cooldown.sync_wandb").upstream_task_ids - {"prepare", "cooldown_plan"} == {"cooldown.train"}
    assert dag.get_task("cooldown.sync_wandb").job == {
        "kind": "cooldown",
        "cooldown": dag.get_task("cooldown.train").job["cooldown"],
    }
    for task_id in syncs:
        task = dag.get_task(task_id)
        assert task.trigger_rule == "all_done"
        assert task.downstream_task_ids <= {"outcome", "report"}  # no training waits for a sync
    online = load_sweep(COOLDOWNS)  # the dev cluster's compute nodes reach W&B themselves
    assert not [t for t in experiment_dag(online, online.experiments[0]).task_ids if t.endswith("sync_wandb")]
    unsynced = load_sweep(COOLDOWNS, ["platform=juwels", "tracking.wandb.sync=false"])
    assert not [t for t in experiment_dag(unsynced, unsynced.experiments[0]).task_ids if t.endswith("sync_wandb")]


def _sync(offline_dir: Path, run_id: str, command: list[str]) -> OfflineRunSync:
    return run_sync(sync_offline_runs(str(offline_dir), run_id, command), LocalShell().run)


def test_the_push_takes_each_finished_offline_run_once_and_paths_stay_inert(tmp_path):
    offline = tmp_path / "a $(touch PWNED) `touch PWNED` b" / "wandb"
    run_id = "exp-0123456789ab"
    for stamp, size in (("20261201_100000", 4096), ("20261202_100000", 7)):  # a run, then a header alone
        run = offline / f"offline-run-{stamp}-{run_id}"
        run.mkdir(parents=True)
        (run / f"run-{run_id}.wandb").write_bytes(b"x" * size)
    (offline / "offline-run-20261203_100000-other-run").mkdir()  # another run's: not this sync's
    marks = [
        sys.executable,
        "-c",
        "import pathlib, sys; [pathlib.Path(f'{p}.synced').touch() for p in pathlib.Path(sys.argv[1]).glob('*.wandb')]",
    ]
    first = _sync(offline, run_id, marks)
    pushed = str(offline / f"offline-run-20261201_100000-{run_id}")
    assert first.synced == [pushed] and first.empty == [str(offline / f"offline-run-20261202_100000-{run_id}")]
    assert _sync(offline, run_id, marks).already == [pushed]  # pushed once
    assert not list(tmp_path.rglob("PWNED"))
    assert _sync(tmp_path / "nothing-here", run_id, marks).summary() == "no offline run yet"


def test_a_run_wandb_did_not_mark_synced_is_a_failure_with_what_wandb_said(tmp_path):
    run = tmp_path / "wandb" / "offline-run-20261201_100000-r1"
    run.mkdir(parents=True)
    (run / "run-r1.wandb").write_bytes(b"x" * 100)
    said = _sync(tmp_path / "wandb", "r1", ["bash", "-c", 'echo "wandb: ERROR 401 Unauthorized: $0"; exit 1'])
    assert said.failed == [(str(run), f"wandb sync exit status 1: wandb: ERROR 401 Unauthorized: {run}")]
    assert not said.synced


@given(st.text())
def test_the_push_report_reads_any_output(stdout):
    report = parse_sync(stdout)
    assert isinstance(report.summary(), str)


def test_two_pushes_of_one_run_at_once_take_turns_and_push_it_once(tmp_path):
    run = tmp_path / "wandb" / "offline-run-20261201_100000-r1"
    run.mkdir(parents=True)
    (run / "run-r1.wandb").write_bytes(b"x" * 100)
    counter = tmp_path / "pushes"
    # a push that takes a while (the second sync starts meanwhile), then marks the run as wandb does
    slow = ["bash", "-c", f'echo pushed >> {shlex.quote(str(counter))}; sleep 2; touch "$0"/run-r1.wandb.synced']
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: _sync(tmp_path / "wandb", "r1", slow), range(2)))
    assert counter.read_text() == "pushed\n"
    assert sorted((len(r.synced), len(r.already)) for r in reports) == [(0, 1), (1, 0)]
