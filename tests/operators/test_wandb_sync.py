"""W&B from a training on the real dev cluster, its compute nodes taken for offline ones: every attempt of the
job logs offline to one W&B run; the offline runs are pushed from the login node over SSH (`wandb sync` of the
real client) to a W&B server (openwandb on 127.0.0.1, in place of W&B's cloud: no internet here), each once
and only after the job that wrote it ended; the training task's W&B link."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from airflow.sdk import DAG

from airflow_oellm.config import load_sweep
from airflow_oellm.config.tracking import wandb_run
from airflow_oellm.hooks import SlurmHook
from airflow_oellm.operators import SlurmSubmitOperator
from airflow_oellm.operators.submit import restart_policy
from airflow_oellm.operators.tracking import WandbSyncOperator
from airflow_oellm.slurm.identity import workspace_key
from airflow_oellm.slurm.target import ClusterTarget
from tests.operators.conftest import start_date, unique_dag_id, xcom
from tests.wandb_server import API_KEY

pytestmark = pytest.mark.tracking

LOGGED = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: ")


def test_attempts_log_offline_to_one_run_and_each_is_pushed_once_after_its_job_ended(
    write, dev_cluster, remote_dir, fake_megatron, slurm_conn_id, wandb_tools, wandb_server, run_dag, monkeypatch
):
    monkeypatch.setenv("AIRFLOW_VAR_OELLM_TEST_WANDB_KEY", API_KEY)
    name = f"wb{uuid.uuid4().hex[:6]}"
    path = write(
        "config/sweeps/wb.yaml",
        f"""
        defaults: [{{platform: devcluster}}]
        project: {{name: {name}, base_output_dir: {remote_dir}/runs}}
        platform:
          secrets: {{WANDB_API_KEY: "var:oellm_test_wandb_key"}}
          env: {{FAKE_CRASH_AT: 15}}  # once: the resumed job is healthy
        backend:
          python: {wandb_tools}/python
          entrypoint: {fake_megatron}
          megatron_path: null
          args: {{train_iters: 30, save_interval: 10, eval_interval: 10, iter_seconds: 0.1}}
        monitoring: {{poll_interval_seconds: 2, inactivity_threshold_seconds: 600}}
        restart: {{max_attempts: 3, retry_delay_seconds: 1}}
        tracking:
          wandb: {{entity: lab, host: "{wandb_server.url}", mode: offline, sync_command: ["{wandb_tools}/wandb", sync]}}
        """,
    )
    exp = load_sweep(path).experiments[0]
    run = wandb_run(exp.config)
    assert run is not None and run.offline
    cluster = ClusterTarget(slurm_conn_id)
    with DAG(dag_id=unique_dag_id("wandb_train"), schedule=None, start_date=start_date(), catchup=False) as dag:
        SlurmSubmitOperator(task_id="train", cluster=cluster, experiment=exp.resolved, **restart_policy(exp.resolved))
    trained = run_dag(dag)
    assert trained.state == "success"
    attempts = xcom(trained, "train")["attempts"]
    assert len(attempts) == 2, attempts  # the crash, then the resumed job
    logged = [len(LOGGED.findall(dev_cluster.ssh(["cat", a["log_path"]]).stdout)) for a in attempts]
    assert all(logged), logged
    offline = sorted(dev_cluster.ssh(["ls", run.offline_dir]).stdout.split())
    offline = [d for d in offline if d.startswith("offline-run-") and d.endswith(f"-{run.run_id}")]
    assert len(offline) == 2, offline  # one per attempt, both of the one run id
    first, newest = (f"{run.offline_dir}/{d}" for d in offline)
    # the W&B link of the training task, kept by Airflow as the UI reads it
    assert xcom(trained, "train", key="_link_WandbRunLink") == f"{wandb_server.url}/lab/{name}/runs/{run.run_id}"

    # a job still running on the training's output directory is writing the newest run: it waits
    script = f"{remote_dir}/busy.sbatch"
    dev_cluster.upload(script, "#!/bin/bash\n#SBATCH --time=00:05:00\nsleep 300\n", mode="0700")
    hook = SlurmHook(cluster=cluster)
    try:
        busy_job, _ = hook.submit_unreconciled(
            script,
            [
                f"--comment=oellm/{workspace_key(exp.paths.output_dir)}/0123456789abcdef/1",
                f"--output={remote_dir}/busy.out",
            ],
        )
        sync = dict(
            env=run.sync_env(), secrets={"WANDB_API_KEY": API_KEY}, workspace_key=workspace_key(exp.paths.output_dir)
        )
        pushed = hook.sync_offline_runs(run.offline_dir, run.run_id, run.sync_command, **sync)
        assert pushed.synced == [first] and pushed.busy == [newest] and not pushed.failed, pushed
        assert len(wandb_server.steps(run.run_id, "lm loss")) == logged[0]
        hook.cancel([busy_job])
        deadline = time.monotonic() + 120
        while not hook.job_status(busy_job).state.is_terminal:
            assert time.monotonic() < deadline, "the cancelled job did not end"
            time.sleep(1)  # scancel is asynchronous: poll until SLURM says it ended

        # the sync task, through Airflow: the rest, with the API key from the secrets
        with DAG(dag_id=unique_dag_id("wandb_sync"), schedule=None, start_date=start_date(), catchup=False) as dag:
            WandbSyncOperator(task_id="sync_wandb", cluster=cluster, experiment=exp.resolved)
        synced = run_dag(dag)
        assert synced.state == "success"
        result = xcom(synced, "sync_wandb")
        assert result["synced"] == [newest] and result["already"] == [first] and not result["failed"], result
        assert result["url"] == f"{wandb_server.url}/lab/{name}/runs/{run.run_id}"
        steps = wandb_server.steps(run.run_id, "lm loss")
        assert len(steps) == sum(logged) and set(steps) == set(range(1, 31))  # every row once; 11-14 twice logged
        assert (run.run_id, exp.name, name) in wandb_server.runs()

        again = hook.sync_offline_runs(run.offline_dir, run.run_id, run.sync_command, **sync)
        assert again.already == [first, newest] and not again.synced, again
        assert wandb_server.steps(run.run_id, "lm loss") == steps  # idempotent: nothing sent twice
    finally:
        hook.close()
