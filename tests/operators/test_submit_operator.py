"""SlurmSubmitOperator with dag.test() on the real dev cluster, a fake Megatron printing the real formats."""

from __future__ import annotations

import json

import pytest
from airflow.sdk import DAG

from airflow_oellm.config import load_sweep
from airflow_oellm.operators import SlurmSubmitOperator
from airflow_oellm.slurm.identity import task_status_path
from tests.operators.conftest import start_date, unique_dag_id, xcom


def experiment(write, backend, *overrides: str, name: str = "exp"):
    path = write(
        "config/sweeps/op.yaml",
        f"""
        defaults: [{{platform: {backend.platform}}}]
        project: {{name: {name}, base_output_dir: {backend.work_dir}/runs}}
        backend:
          python: python3
          entrypoint: {backend.fake_megatron}
          megatron_path: null
          args: {{train_iters: 30, save_interval: 10, eval_interval: 10, iter_seconds: 0.1}}
        monitoring: {{poll_interval_seconds: 2, inactivity_threshold_seconds: 600}}
        restart: {{max_attempts: 3, retry_delay_seconds: 1}}
        """,
    )
    return load_sweep(path, list(overrides)).experiments[0]


def train_dag(exp, backend, **operator_kwargs):
    from airflow_oellm.operators.submit import restart_policy

    with DAG(dag_id=unique_dag_id("train"), schedule=None, start_date=start_date(), catchup=False) as dag:
        SlurmSubmitOperator(
            task_id="train",
            **backend.conn,
            experiment=exp.resolved,
            **{**restart_policy(exp.resolved), **operator_kwargs},
        )
    return dag


def tis(dag_run):
    return {ti.task_id: ti for ti in dag_run.get_task_instances()}


def test_train_to_completion_with_events(write, backend, run_dag):
    exp = experiment(write, backend)
    dr = run_dag(train_dag(exp, backend))
    assert dr.state == "success", tis(dr)["train"].state
    result = xcom(dr, "train")
    assert result["classification"]["verdict"] == "success" and result["final_state"] == "COMPLETED"
    summary = result["summary"]
    assert summary["last_iteration"] == 30 and summary["iterations_run"] == 30
    assert summary["checkpoints_saved"] == [10, 20, 30] and summary["resumed_from"] == 0
    assert [v["iteration"] for v in summary["validation"]] == [10, 20, 30]
    assert result["events"]["iteration"] == 30 and result["checkpoint"] == 30
    assert len(result["job_ids"]) == 1 and tis(dr)["train"].try_number == 1
    status = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))
    assert status["state"] == "completed" and status["run_id"] == dr.run_id and status["iteration"] == 30
    scripts = backend.run(["ls", exp.paths.script_dir]).split()
    assert scripts == [f"{exp.name}-try1.sbatch"]
    mode = backend.run(["stat", "-c", "%a", f"{exp.paths.script_dir}/{scripts[0]}"]).strip()
    assert mode == "700"


def test_oom_fails_without_retry(write, backend, run_dag):
    exp = experiment(write, backend)
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_OOM_AT"] = 5
    dr = run_dag(dag)
    ti = tis(dr)["train"]
    assert dr.state == "failed" and ti.try_number == 1  # three attempts allowed, one used
    result = xcom(dr, "train", "result")
    assert result["classification"]["verdict"] == "fatal" and "out of memory" in result["classification"]["reason"]
    status = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))
    assert status["state"] == "failed"


def test_user_scancel_fails_without_retry(write, backend, run_dag):
    import threading
    import time

    exp = experiment(write, backend, "backend.args.train_iters=600", "backend.args.iter_seconds=0.5")

    def cancel_when_running():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ids = backend.run(["squeue", "-h", "--me", "-t", "RUNNING", f"--name={exp.name}", "-o", "%A"])
            if ids.split():
                time.sleep(2)
                backend.run(["scancel", *ids.split()])
                return
            time.sleep(1)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    dr = run_dag(train_dag(exp, backend))
    canceller.join()
    assert dr.state == "failed" and tis(dr)["train"].try_number == 1
    result = xcom(dr, "train", "result")
    assert result["classification"]["reason"] == "cancelled by a user"


def test_hang_is_cancelled_and_retried(write, backend, run_dag):
    exp = experiment(write, backend, "backend.args.save_interval=3", "monitoring.inactivity_threshold_seconds=12")
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_HANG_AT"] = 8
    dr = run_dag(dag)
    assert dr.state == "success", tis(dr)["train"].state
    result = xcom(dr, "train")
    first, second = result["attempts"]
    assert first["verdict"] == "retry" and first["reason"].startswith("hang") and first["state"] == "CANCELLED"
    # resumed from the last checkpoint before the cancel (the fake saves on SIGTERM, as Megatron can)
    assert second["resumed_from"] == first["checkpoint_after"] >= 6
    assert second["verdict"] == "success" and tis(dr)["train"].try_number == 2


@pytest.mark.slow
def test_time_limit_resubmits_and_resumes_from_the_checkpoint(write, backend, run_dag):
    exp = experiment(
        write,
        backend,
        "slurm.time=60",
        "backend.args.train_iters=110",
        "backend.args.iter_seconds=1",
        "backend.args.save_interval=20",
    )
    dr = run_dag(train_dag(exp, backend))
    assert dr.state == "success"
    result = xcom(dr, "train")
    first, second = result["attempts"]
    assert first["state"] == "TIMEOUT" and first["verdict"] == "retry"
    # SIGTERM at the limit saved the current iteration; the second job loaded exactly that checkpoint
    assert second["resumed_from"] == first["checkpoint_after"] > 20
    assert second["verdict"] == "success" and result["last_iteration"] == 110
    assert len(set(result["job_ids"])) == 2


def test_progress_guard_stops_a_deterministic_crash(write, backend, run_dag):
    exp = experiment(write, backend, "restart.max_attempts=6")
    dag = train_dag(exp, backend)
    env = dag.get_task("train").experiment.value["platform"]["env"]
    env.update(FAKE_CRASH_AT=3, FAKE_FAULT_ALWAYS=1)  # crashes before the first checkpoint, every time
    dr = run_dag(dag)
    ti = tis(dr)["train"]
    assert dr.state == "failed" and ti.try_number == 2  # five retries allowed; the guard stopped after two
    result = xcom(dr, "train", "result")
    assert "no progress over the last two attempts" in result["classification"]["reason"]
    assert [a["verdict"] for a in result["attempts"]] == ["retry", "fatal"]


def test_node_failure_excludes_the_node_on_the_next_submission(write, backend, run_dag):
    node = backend.node
    exp = experiment(write, backend, "restart.max_attempts=2")
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_NODE_FAIL_AT"] = 3
    dr = run_dag(dag)
    # the dev cluster has one node: excluding it leaves nowhere to run, and sbatch says so at once
    assert dr.state == "failed" and tis(dr)["train"].try_number == 2
    script = backend.run(["cat", f"{exp.paths.script_dir}/{exp.name}-try2.sbatch"])
    assert f"#SBATCH --exclude={node}\n" in script
    status = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))
    assert status["state"] == "failed" and "Requested node configuration is not available" in status["reason"]
