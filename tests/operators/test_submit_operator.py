"""SlurmSubmitOperator with dag.test() on the real dev cluster, a fake Megatron printing the real formats."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import re
import shlex
import threading
import uuid
from datetime import datetime
from types import SimpleNamespace

import pytest
from airflow.sdk import DAG

from airflow_oellm.config import load_sweep
from airflow_oellm.operators import SlurmSubmitOperator
from airflow_oellm.slurm.identity import task_status_path
from airflow_oellm.slurm.target import ClusterTarget
from tests.conftest import REPO
from tests.operators.conftest import attempt_history, start_date, unique_dag_id, xcom
from tests.webhook import Receiver


def experiment(write, backend, *overrides: str, name: str | None = None):
    # a name of its own: tests that cancel or requeue by name must not touch another test's job
    name = name or f"exp{uuid.uuid4().hex[:6]}"
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


ITERATION_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: (\S+) \|")


def assert_loss_continues(backend, attempts: list[dict], tolerance: float = 0.05) -> None:
    """Each resumed job's first logged loss continues its predecessor's last one (a job that started
    over from random weights would log the first iterations' much higher loss)."""
    curves = []
    for attempt in attempts:
        log = backend.run(["cat", attempt["log_path"]])
        curves.append([(int(i), float(v)) for i, v in ITERATION_LOSS.findall(log)])
    # a job that resumed at the very end logs no iteration: nothing to continue there
    logged = [c for c in curves if c]
    assert len(logged) >= 2, curves
    for before, after in itertools.pairwise(logged):
        first_it, first_loss = after[0]
        # the same iteration's loss when the predecessor got that far (a redone stretch), else its last one
        reference = dict(before).get(first_it, before[-1][1])
        assert first_it > 1 and abs(first_loss - reference) <= tolerance * reference, (before[-3:], after[:3])


def submitted(backend, exp) -> list[str]:
    """The job ids the cluster-side submission records hold for the experiment's output directory:
    one per sbatch that returned, whatever Airflow remembers."""
    records = f"{shlex.quote(exp.paths.output_dir)}/.oellm/submissions/*"
    return backend.run(["sh", "-c", f"cat {records} 2>/dev/null || true"]).split()


def tis(dag_run):
    return {ti.task_id: ti for ti in dag_run.get_task_instances()}


def test_train_to_completion_with_events(write, backend, run_dag):
    exp = experiment(write, backend, "backend.args.iter_seconds=0.3")  # long enough to be seen running
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
    # what the dashboard shows while the job runs: the trigger's progress XCom of this task instance
    progress = xcom(dr, "train", key="progress")
    assert progress["job_id"] == result["job_ids"][0] and progress["job_state"] == "RUNNING", progress
    assert 1 <= progress["summary"]["last_iteration"] <= 30 and progress["summary"]["loss_curve"]
    status = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))
    assert status["state"] == "completed" and status["run_id"] == dr.run_id and status["iteration"] == 30
    scripts = backend.run(["ls", exp.paths.script_dir]).split()
    assert scripts == [f"{exp.name}-try1.sbatch"]
    mode = backend.run(["stat", "-c", "%a", f"{exp.paths.script_dir}/{scripts[0]}"]).strip()
    assert mode == "700"


@pytest.mark.faults
def test_oom_fails_without_retry(write, backend, run_dag, reliability):
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
    reliability.record(
        f"CUDA out-of-memory line ({backend.batch_system})",
        "failed at once, not retried: the reason names the out-of-memory error",
        duplicates=len(submitted(backend, exp)) - 1,
    )


@pytest.mark.faults
def test_user_scancel_fails_without_retry(write, backend, run_dag, reliability):
    import threading
    import time

    exp = experiment(write, backend, "backend.args.train_iters=600", "backend.args.iter_seconds=0.5")

    def cancel_when_running():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ids = backend.run(["squeue", "-h", "--me", "-t", "RUNNING", f"--name={exp.name}", "-o", "%A"])
            if ids.split():
                time.sleep(2)  # cancel a job that has been training for a moment, as a user would
                backend.run(["scancel", *ids.split()])
                return
            time.sleep(1)  # poll

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    dr = run_dag(train_dag(exp, backend))
    canceller.join()
    assert dr.state == "failed" and tis(dr)["train"].try_number == 1
    result = xcom(dr, "train", "result")
    assert result["classification"]["reason"] == "cancelled by a user"
    reliability.record(
        f"user scancel ({backend.batch_system})",
        "failed, not retried: `CANCELLED by <uid>` is the user's decision",
        duplicates=len(submitted(backend, exp)) - 1,
    )


@pytest.mark.faults
def test_hang_is_cancelled_and_retried(write, backend, run_dag, reliability):
    receiver = Receiver()  # the sweep's notifiers hear that it stalled
    notify = f"+notifications={{notify: [{{webhook: '{receiver.url}', events: [stalled, training_fatal]}}]}}"
    exp = experiment(
        write, backend, "backend.args.save_interval=3", "monitoring.inactivity_threshold_seconds=12", notify
    )
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_HANG_AT"] = 8
    try:
        dr = run_dag(dag)
    finally:
        receiver.server.shutdown()
    assert dr.state == "success", tis(dr)["train"].state
    result = xcom(dr, "train")
    first, second = result["attempts"]
    assert first["verdict"] == "retry" and first["reason"].startswith("hang") and first["state"] == "CANCELLED"
    assert [r["alert"]["event"] for r in receiver.received] == ["stalled"], receiver.received
    assert receiver.received[0]["alert"]["reason"].startswith(f"job {first['job_id']} CANCELLED: hang")
    # resumed from the last checkpoint before the cancel (the fake saves on SIGTERM, as Megatron can)
    assert second["resumed_from"] == first["checkpoint_after"] >= 6
    assert second["verdict"] == "success" and tis(dr)["train"].try_number == 2
    reliability.record(
        f"hang: no output, no progress ({backend.batch_system})",
        "cancelled after the inactivity threshold, retried, resumed from the checkpoint saved on SIGTERM",
        duplicates=len(submitted(backend, exp)) - len(result["attempts"]),
        lost_events=30 - result["last_iteration"],
        inactivity_threshold_seconds=12,
    )


@pytest.mark.slow
@pytest.mark.faults
def test_time_limit_resubmits_and_resumes_from_the_checkpoint(write, backend, run_dag, reliability):
    # a one-minute limit lets a job run 60 s to ~95 s (slurmctld checks limits every ~30 s; KillWait 5 s):
    # 200 iterations of 1 s never fit in two jobs, so at least two time limits come before the end
    exp = experiment(
        write,
        backend,
        "slurm.time=60",
        "restart.max_attempts=5",
        "backend.args.train_iters=200",
        "backend.args.iter_seconds=1",
        "backend.args.save_interval=20",
    )
    dr = run_dag(train_dag(exp, backend))
    assert dr.state == "success"
    result = xcom(dr, "train")
    *limited, last = result["attempts"]
    assert len(limited) >= 2, result["attempts"]
    assert all(a["state"] == "TIMEOUT" and a["verdict"] == "retry" for a in limited)
    # SIGTERM at each limit saved the current iteration; the next job loaded exactly that checkpoint
    for before, after in zip(limited, [*limited[1:], last], strict=True):
        assert after["resumed_from"] == before["checkpoint_after"] > (before["resumed_from"] or 0)
    assert last["verdict"] == "success" and result["last_iteration"] == 200
    assert len(set(result["job_ids"])) == len(result["attempts"])
    assert_loss_continues(backend, result["attempts"])
    reliability.record(
        f"time limit reached again and again ({backend.batch_system})",
        f"TIMEOUT {len(limited)} times, resubmitted each time; each job resumed from the checkpoint its "
        "predecessor saved on SIGTERM, the loss continuing",
        duplicates=len(submitted(backend, exp)) - len(result["attempts"]),
        lost_events=200 - result["last_iteration"],
        resumed_from=[a["resumed_from"] for a in result["attempts"]],
    )


@pytest.mark.faults
def test_a_crash_is_retried_and_resumes_from_the_last_checkpoint(write, backend, run_dag, reliability):
    exp = experiment(write, backend)
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_CRASH_AT"] = 15  # once: the rerun is healthy
    dr = run_dag(dag)
    assert dr.state == "success", tis(dr)["train"].state
    result = xcom(dr, "train")
    first, second = result["attempts"]
    assert first["state"] == "FAILED" and first["verdict"] == "retry" and first["checkpoint_after"] == 10
    assert second["resumed_from"] == 10 and second["verdict"] == "success" and result["last_iteration"] == 30
    assert_loss_continues(backend, result["attempts"])
    reliability.record(
        f"crash at iteration 15 ({backend.batch_system})",
        "retried; the new job resumed from checkpoint 10 and finished",
        duplicates=len(submitted(backend, exp)) - len(result["attempts"]),
        lost_events=30 - result["last_iteration"],
    )


@pytest.mark.faults
def test_progress_guard_stops_a_deterministic_crash(write, backend, run_dag, reliability):
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
    reliability.record(
        f"deterministic crash before any checkpoint ({backend.batch_system})",
        "stopped by the progress guard after two attempts, not five",
        duplicates=len(submitted(backend, exp)) - len(result["attempts"]),
    )


@pytest.mark.faults
def test_node_failure_excludes_the_node_on_the_next_submission(write, backend, run_dag, reliability):
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
    reliability.record(
        f"node failure line ({backend.batch_system})",
        f"retried with `#SBATCH --exclude={node}`; on a one-node cluster sbatch then refuses, and the task says so",
        duplicates=len(submitted(backend, exp)) - 1,
    )


@pytest.mark.faults
@pytest.mark.parametrize("backend", ["slurm"], indirect=True)  # local processes have no requeue
def test_a_preempted_job_is_requeued_and_followed_to_its_end(write, backend, run_dag, reliability):
    """`scontrol requeue` (what preemption with PreemptMode=REQUEUE does): the same job id starts again,
    resumes from the checkpoint the fake saved on SIGTERM, and the task follows it without a retry."""
    import threading
    import time

    exp = experiment(write, backend, "backend.args.train_iters=60", "backend.args.iter_seconds=0.5")
    tracker = f"{exp.paths.checkpoint_dir}/latest_checkpointed_iteration.txt"
    requeued: dict[str, object] = {}

    def requeue_after_a_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ids = backend.run(["squeue", "-h", "--me", "-t", "RUNNING", f"--name={exp.name}", "-o", "%A"]).split()
            saved = backend.run(["sh", "-c", f"cat {shlex.quote(tracker)} 2>/dev/null || true"]).strip()
            if ids and saved and int(saved) >= 20:
                backend.run(["scontrol", "requeue", ids[0]])
                requeued.update(job=ids[0], at=time.monotonic())
                return
            time.sleep(1)  # poll

    preempter = threading.Thread(target=requeue_after_a_checkpoint)
    preempter.start()
    dr = run_dag(train_dag(exp, backend))
    preempter.join()
    assert requeued, "the job was never seen running past checkpoint 20"
    assert dr.state == "success", tis(dr)["train"].state
    result = xcom(dr, "train")
    assert result["job_ids"] == [requeued["job"]] and len(result["attempts"]) == 1
    assert result["final_state"] == "COMPLETED" and result["last_iteration"] == 60
    log = backend.run(["cat", result["attempts"][0]["log_path"]])
    resumed = re.search(r"successfully loaded checkpoint from \S+ \[ t 1/1, p 1/1 \] at iteration (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 20, log[:2000]
    reliability.record(
        "preemption (scontrol requeue)",
        f"the job restarted under its id, resumed from checkpoint {resumed.group(1)}; followed to its end, no retry",
        duplicates=len(submitted(backend, exp)) - 1,
        lost_events=60 - result["last_iteration"],
    )


@pytest.mark.faults
@pytest.mark.megatron
def test_the_rerun_state_machine_exit_16_excludes_its_node_and_resumes(write, backend, run_dag, reliability):
    """Megatron's rerun state machine saves a checkpoint and exits 16 to be resumed on another GPU."""
    node = backend.node
    exp = experiment(write, backend, "restart.max_attempts=2")
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_RERUN_AT"] = 15
    dr = run_dag(dag)
    first = attempt_history(dr, "train")["attempts"][0]
    assert (first["state"], first["exit_code"], first["verdict"]) == ("FAILED", 16, "retry"), first
    assert "exit 16" in first["reason"] and first["progress_free"] and first["checkpoint_after"] == 14
    # the next submission avoids the node the message named; on a one-node cluster that leaves nowhere to run
    script = backend.run(["cat", f"{exp.paths.script_dir}/{exp.name}-try2.sbatch"])
    assert f"#SBATCH --exclude={node}\n" in script
    assert dr.state == "failed"
    status = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))
    assert "Requested node configuration is not available" in status["reason"]
    reliability.record(
        f"rerun state machine exit 16 ({backend.batch_system})",
        f"retried with `#SBATCH --exclude={node}` (the node the message named), not held against the progress guard",
        duplicates=len(submitted(backend, exp)) - 1,
    )


@pytest.mark.faults
@pytest.mark.megatron
@pytest.mark.parametrize("backend", ["local-process"], indirect=True)  # a node to exclude that is not this one
def test_after_exit_16_the_job_resumes_from_the_checkpoint_it_saved(write, backend, run_dag):
    exp = experiment(write, backend, "restart.max_attempts=3")
    dag = train_dag(exp, backend)
    env = dag.get_task("train").experiment.value["platform"]["env"]
    env.update(FAKE_RERUN_AT=15, FAKE_RERUN_NODE="gpu-node-7")  # the suspect GPU was on another node of the job
    dr = run_dag(dag)
    assert dr.state == "success", tis(dr)["train"].state
    result = xcom(dr, "train")
    first, second = result["attempts"]
    assert first["exit_code"] == 16 and first["progress_free"] and first["checkpoint_after"] == 14
    assert second["resumed_from"] == 14 and second["verdict"] == "success" and result["last_iteration"] == 30
    script = backend.run(["cat", f"{exp.paths.script_dir}/{exp.name}-try2.sbatch"])
    assert "#SBATCH --exclude=gpu-node-7\n" in script
    assert_loss_continues(backend, result["attempts"])


@pytest.mark.faults
@pytest.mark.megatron
def test_a_diverged_training_is_stopped_and_not_retried(write, backend, run_dag, reliability):
    """A NaN loss from iteration 12 on (bf16-style lines: no lm loss, grad norm nan), rewinds turned off: after three
    log intervals the watcher cancels the job instead of letting it burn its time limit, and the training fails
    without a retry."""
    overrides = (
        "backend.args.train_iters=200",
        "monitoring.nan_intervals=3",
        "monitoring.anomalies.rewind.max_rewinds=0",
    )
    exp = experiment(write, backend, *overrides)
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_NAN_FROM"] = 12
    dr = run_dag(dag)
    assert dr.state == "failed" and tis(dr)["train"].try_number == 1  # not retried
    result = xcom(dr, "train", "result")
    (attempt,) = result["attempts"]
    assert attempt["state"] == "CANCELLED" and attempt["verdict"] == "fatal"
    assert "the loss diverged" in result["classification"]["reason"]
    # stopped a poll or two (2 s, 20 iterations each) after the third NaN line, far from its 200 iterations
    assert 14 <= attempt["last_iteration"] < 100, attempt["last_iteration"]
    reliability.record(
        f"loss NaN from iteration 12 ({backend.batch_system})",
        f"cancelled at iteration {attempt['last_iteration']} of 200 after three NaN intervals; failed, not retried",
        duplicates=len(submitted(backend, exp)) - 1,
    )


@pytest.mark.anomalies
def test_a_nan_loss_is_rewound_and_fails_once_it_comes_back_after_the_last_rewind(write, backend, run_dag, reliability):
    """A NaN loss from iteration 12 on that no rewind cures (the fake trainer ignores what it is told to skip): the
    first divergence kills the job (no save), sets the save directory back to checkpoint 10, and the next job resumes
    there skipping the NaN stretch; the second divergence, with max_rewinds 1 used up, fails the training."""
    overrides = ("backend.args.train_iters=200", "monitoring.anomalies.rewind.max_rewinds=1")
    exp = experiment(write, backend, *overrides)
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_NAN_FROM"] = 12
    dr = run_dag(dag)
    assert dr.state == "failed" and tis(dr)["train"].try_number == 2
    first, second = xcom(dr, "train", "result")["attempts"]
    rewind = first["rewind"]
    assert first["verdict"] == "retry" and first["reason"].startswith("rewind: NaN loss at 12 -> checkpoint 10")
    assert (rewind["start"], rewind["rewind_to"], rewind["skipped"][0]) == (12, 10, 11)
    assert rewind["discarded"] is not None  # done: the tracker went back to 10 before the second job
    assert second["checkpoint_before"] == 10 and second["resumed_from"] == 10
    script = backend.run(["cat", exp.paths.script_dir + f"/{exp.name}-try2.sbatch"])
    skipped = " ".join(f'"{i}"' for i in range(11, rewind["skipped"][1] + 1))
    assert f"--iterations-to-skip {skipped}" in script
    assert second["verdict"] == "fatal" and "after 1 rewind(s): rewind: NaN loss at 12" in second["reason"]
    # failed, and set back all the same: a manual resume loads checkpoint 10, not the NaN weights saved since
    assert second["rewind"]["discarded"] is not None and second["reason"].endswith("back at checkpoint 10")
    assert backend.run(["cat", f"{exp.paths.checkpoint_dir}/latest_checkpointed_iteration.txt"]).strip() == "10"
    reliability.record(
        f"loss NaN from iteration 12, every time ({backend.batch_system})",
        f"rewound to checkpoint 10 skipping 11-{rewind['skipped'][1]}; NaN again: failed after 1 rewind",
        duplicates=len(submitted(backend, exp)) - 2,
    )


@pytest.mark.faults
@pytest.mark.megatron
def test_the_rerun_state_machine_exit_17_fails_with_its_diagnosis(write, backend, run_dag):
    exp = experiment(write, backend, "restart.max_attempts=3")
    dag = train_dag(exp, backend)
    dag.get_task("train").experiment.value["platform"]["env"]["FAKE_RERUN_FAILED_AT"] = 15
    dr = run_dag(dag)
    assert dr.state == "failed" and tis(dr)["train"].try_number == 1  # two retries allowed, none taken
    result = xcom(dr, "train", "result")
    assert result["attempts"][0]["exit_code"] == 17
    assert result["classification"]["reason"] == (
        "failed on result validation (Megatron's rerun state machine, exit 17): Possible persistent error"
    )


@pytest.mark.faults
@pytest.mark.megatron
@pytest.mark.parametrize("backend", ["local-process"], indirect=True)  # a node to exclude that is not this one
def test_resumes_the_rerun_state_machine_asks_for_are_not_held_against_the_progress_guard(write, backend, run_dag):
    # every job stops at iteration 15 with exit 16 (the same GPU again, say): no new checkpoint after the first
    exp = experiment(write, backend, "restart.max_attempts=4")
    dag = train_dag(exp, backend)
    env = dag.get_task("train").experiment.value["platform"]["env"]
    env.update(FAKE_RERUN_AT=15, FAKE_RERUN_NODE="gpu-node-7", FAKE_FAULT_ALWAYS=1)
    dr = run_dag(dag)
    assert dr.state == "failed" and tis(dr)["train"].try_number == 4  # every retry taken
    result = xcom(dr, "train", "result")
    assert [a["checkpoint_after"] for a in result["attempts"]] == [14, 14, 14, 14]
    assert all(a["progress_free"] and "exit 16" in a["reason"] for a in result["attempts"])
    assert "no progress" not in result["classification"]["reason"]  # a crash would have stopped at the third


def kill_before_its_first_save(dev_cluster, log_dir: str, save_dir: str, stop: threading.Event) -> list[str]:
    """Beside the DAG run: once the second job's log shows iteration 42 (it resumed at 40, its next save is at
    80), kill its trainer as a crash would. Returns what it did."""
    done: list[str] = []
    while not stop.is_set() and not done:
        logs = sorted(dev_cluster.ssh(["sh", "-c", f"ls {shlex.quote(log_dir)} 2>/dev/null || true"]).stdout.split())
        if len(logs) >= 2:
            log = dev_cluster.ssh(["cat", f"{log_dir}/{logs[1]}"]).stdout
            if re.search(r"iteration\s+42/", log):
                dev_cluster.ssh(["pkill", "-KILL", "-f", f"save {save_dir}"], check=False)
                done.append(logs[1])
        stop.wait(0.2)  # the next look at the cluster
    return done


@pytest.mark.anomalies
@pytest.mark.demo
def test_a_real_loss_spike_is_rewound_skipped_and_trained_through(
    dev_cluster, remote_dir, slurm_conn_id, run_dag, cluster_tools, write, reliability
):
    """The tiny trainer really diverges: samples 400-439 (iterations 51-55) are bad. The watcher finds the spike,
    kills the job when it has not recovered 20 intervals later, sets the save directory back to checkpoint 40 and
    resubmits, skipping the diverged batches, at half the learning rate for 20 trained iterations. That job is
    killed before its first save: the resume after it still loads checkpoint 40, never the discarded 80, and still
    lowers the rate. The lowered iterations end at 82, where that job stops; the next goes on at the configured
    rate over the lowered one its checkpoint holds (the tiny trainer, like Megatron, refuses a checkpoint whose
    scheduler differs unless told). The run trains through, its curve continuous with the first."""
    name = f"spike{uuid.uuid4().hex[:6]}"
    path = write(
        "config/sweeps/spike.yaml",
        f"""
        defaults: [{{platform: devcluster}}, {{model: tiny}}, _self_]
        project: {{name: {name}, base_output_dir: {remote_dir}/runs}}
        platform: {{ssh_conn_id: {slurm_conn_id}}}
        backend:
          python: {cluster_tools.with_name("python")}
          megatron_path: {REPO / "examples" / "tiny_megatron"}
          args: {{train_iters: 120, save_interval: 40, log_interval: 1, iter_seconds: 0.1, poisoned_samples: "400:440",
                  lr: 3.0e-3, min_lr: 3.0e-4, lr_warmup_iters: 0}}
        monitoring:
          poll_interval_seconds: 2
          anomalies: {{rewind: {{learning_rate: {{multiplier: 0.5, iterations: 20}}}}}}
        restart: {{max_attempts: 5, retry_delay_seconds: 1}}
        """,
    )
    exp = load_sweep(path).experiments[0]
    save_dir = exp.resolved["backend"]["args"]["save"]
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_before_its_first_save, dev_cluster, exp.paths.log_dir, save_dir, stop)
        try:
            dr = run_dag(train_dag(exp, SimpleNamespace(conn={"cluster": ClusterTarget(slurm_conn_id)})))
        finally:
            stop.set()
        killed = killer.result()
    assert dr.state == "success", xcom(dr, "train", "result")
    spiked, crashed, lowered, finished = attempt_history(dr, "train")["attempts"]
    rewind = spiked["rewind"]
    # 20 trained iterations from 40 at half the rate: 41-49, then 72-82 after the skipped 50-71
    assert spiked["reason"].startswith(
        "rewind: loss spike at 51 -> checkpoint 40, skipping 50-71, learning rate x0.5 until 82"
    )
    assert (rewind["start"], rewind["detected_at"], rewind["rewind_to"]) == (51, 71, 40)
    assert rewind["learning_rate"] == {"multiplier": 0.5, "until": 82}
    # killed (no save on the way out) a poll or so after 71: a regular save at 80 may have come first, moved aside
    assert set(rewind["discarded"]) <= {80} and spiked["last_iteration"] < 120
    for iteration in rewind["discarded"]:
        dev_cluster.ssh(["test", "-f", f"{save_dir}/discarded/{rewind['id']}/iter_{iteration:07d}/metadata.json"])
    assert killed and crashed["checkpoint_before"] == 40 and crashed["resumed_from"] == 40
    assert crashed["verdict"] == "retry" and crashed["last_iteration"] < 80
    # the resume after the crash loads the rewound state: checkpoint 40, not the diverged 80; it stops at 82
    assert lowered["resumed_from"] == 40 and lowered["verdict"] == "retry"
    assert (lowered["last_iteration"], lowered["checkpoint_after"]) == (82, 82)
    assert lowered["reason"] == "learning rate x0.5 until 82 done: the next job trains at the configured one"
    assert finished["resumed_from"] == 82 and finished["verdict"] == "success"
    # the rates each job logged: the configured cosine schedule (checked on the first job), half of it while lowered
    rates = [logged_rates(dev_cluster.ssh(["cat", a["log_path"]]).stdout) for a in (spiked, crashed, lowered, finished)]

    def configured(i: int) -> float:
        return 3.0e-4 + (3.0e-3 - 3.0e-4) * 0.5 * (1 + math.cos(math.pi * i / 120))

    assert all(r == pytest.approx(configured(i), rel=1e-5) for i, r in rates[0].items()) and 71 in rates[0]
    for job in rates[1:3]:
        assert job and all(r == pytest.approx(0.5 * configured(i), rel=1e-5) for i, r in job.items())
    assert set(rates[2]) == {*range(41, 50), *range(72, 83)}  # skipped iterations are not logged
    assert set(rates[3]) == set(range(83, 121))
    assert all(r == pytest.approx(configured(i), rel=1e-5) for i, r in rates[3].items())
    curves = [dict(map(tuple, a["loss_curve"])) for a in (spiked, lowered, finished)]
    rewound = {**curves[1], **curves[2]}
    assert not set(rewound) & set(range(50, 72))  # the diverged batches were skipped
    assert rewound[41] == pytest.approx(curves[0][41], rel=1e-6)  # the same model at 40: the same step 41
    assert max(rewound.values()) <= 1.1 * curves[0][41] < curves[0][71]  # no spike the second time
    assert dev_cluster.ssh(["cat", f"{save_dir}/latest_checkpointed_iteration.txt"]).stdout.strip() == "120"
    summary = xcom(dr, "train")["summary"]  # the last job's
    assert not [a for a in summary["anomalies"] if a["name"].startswith("loss_spike")]
    log = dev_cluster.ssh(["cat", spiked["log_path"]]).stdout
    stamp = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] iteration\s+51/", log).group(1)
    spike_to_running = (
        datetime.fromisoformat(crashed["start"]) - datetime.fromisoformat(stamp).replace(tzinfo=None)
    ).total_seconds()
    reliability.record(
        "a real loss spike (tiny trainer, bad samples at iterations 51-55)",
        f"spike found at 52 (1 iteration late), unrecovered at 71; rewound to 40 skipping 50-71 at half the learning "
        f"rate until 82, the rewound job running {spike_to_running:.0f} s after the spike; killed before its first "
        f"save, resumed from 40 again; final loss {curves[2][120]:.3f}",
        duplicates=0,
        spike_to_rewound_job_seconds=round(spike_to_running),
    )


def logged_rates(log: str) -> dict[int, float]:
    """Iteration -> the learning rate its iteration line reports."""
    found = re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?learning rate: ([0-9.E+-]+)", log)
    return {int(i): float(rate) for i, rate in found}


@pytest.mark.retention
def test_retention_deletes_older_checkpoints_while_training_but_none_a_branch_still_needs(write, backend, run_dag):
    """keep_last 2 over saves every 10 iterations. Every checkpoint has a conversion branch: the status files of
    the conversions of 20 and 30 say completed (their tasks ran), the one of 10 says running. The watch deletes
    20 and 30 after later saves, and keeps 10 for its branch and the newest two."""
    from airflow_oellm.config.milestones import CONVERT, side_job_dir
    from airflow_oellm.config.naming import CHECKPOINT_CONVERT_TASK

    exp = experiment(write, backend, "backend.args.train_iters=60", "backend.args.iter_seconds=0.3", "+retention={}")
    for iteration, state in ((10, "running"), (20, "completed"), (30, "completed")):
        status = task_status_path(side_job_dir(exp.paths.output_dir, CONVERT, iteration), CHECKPOINT_CONVERT_TASK)
        backend.run(["mkdir", "-p", status.rsplit("/", 1)[0]])
        backend.run(["sh", "-c", f"printf '%s' {shlex.quote(json.dumps({'state': state}))} > {shlex.quote(status)}"])
    dr = run_dag(train_dag(exp, backend))
    assert dr.state == "success", tis(dr)["train"].state
    assert xcom(dr, "train")["summary"]["checkpoints_saved"] == [10, 20, 30, 40, 50, 60]
    left = {int(n[5:]) for n in backend.run(["ls", exp.paths.checkpoint_dir]).split() if n.startswith("iter_")}
    assert {10, 50, 60} <= left and not {20, 30} & left, left


@pytest.mark.anomalies
def test_a_loss_spike_that_comes_back_after_the_last_rewind_fails_the_training(write, backend, run_dag, reliability):
    """The data of iterations 30-31 damages the model (the loss jumps by 6 and decays over hundreds of
    iterations), and the rewound job is not told to skip it (`skip_data: false`): rewound once to checkpoint 20,
    the spike comes back at 30, and with max_rewinds 1 used up the training fails, its history in the reason."""
    exp = experiment(
        write,
        backend,
        "backend.args.train_iters=80",
        "backend.args.iter_seconds=0.3",  # slow enough for the watch to act at 50, before the job's end
        "+backend.args.fake_bad_iterations='30:32'",
        "monitoring.anomalies.rewind.max_rewinds=1",
        "monitoring.anomalies.rewind.skip_data=false",
    )
    dr = run_dag(train_dag(exp, backend))
    assert dr.state == "failed" and tis(dr)["train"].try_number == 2
    first, second = xcom(dr, "train", "result")["attempts"]
    assert first["verdict"] == "retry" and first["reason"].startswith("rewind: loss spike at 30 -> checkpoint 20")
    assert "skipping" not in first["reason"] and first["rewind"]["discarded"] is not None
    assert second["resumed_from"] == 20 and "--iterations-to-skip" not in backend.run(
        ["cat", exp.paths.script_dir + f"/{exp.name}-try2.sbatch"]
    )
    assert second["verdict"] == "fatal", second
    assert "after 1 rewind(s): rewind: loss spike at 30 -> checkpoint 20" in second["reason"], second["reason"]
    assert second["rewind"]["anomaly"] == "loss_spike" and second["rewind"]["start"] == 30
    assert backend.run(["cat", f"{exp.paths.checkpoint_dir}/latest_checkpointed_iteration.txt"]).strip() == "20"
    reliability.record(
        f"loss spike from the same bad data after the last rewind ({backend.batch_system})",
        "rewound to checkpoint 20 without skipping the data; the spike came back at 30: failed after 1 rewind, "
        "the save directory back at 20",
        duplicates=len(submitted(backend, exp)) - 2,
    )


@pytest.mark.early_stop
def test_a_training_the_sweeps_early_stopping_asks_to_stop_ends_skipped_with_its_reason(write, backend, run_dag):
    """The stop request's file, written on the cluster as the sweep's rung would: the watch cancels the job and
    the task ends skipped (not failed), saying why; the sensors beside it read `stopped`."""
    import time

    from airflow_oellm.monitor.early_stop import StopRequest
    from airflow_oellm.slurm.identity import stop_request_path

    exp = experiment(write, backend, "backend.args.train_iters=600", "backend.args.iter_seconds=0.2")
    resolved = exp.resolved
    reason = "stopped early: rank 2/2 at 10 (loss 9.1 vs best 8.9)"
    request = stop_request_path(exp.paths.output_dir)
    log_glob = f"{exp.paths.log_dir}/*.out"

    def stop_past_the_rung() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = backend.run(["sh", "-c", f"cat {log_glob} 2>/dev/null || true"])
            if "iteration       12/" in log:
                run_id = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))["run_id"]
                for asked in (StopRequest(reason, 10, "an earlier run"), StopRequest(reason, 10, run_id)):
                    write_request = f"mkdir -p {shlex.quote(request.rsplit('/', 1)[0])} && cat > {shlex.quote(request)}"
                    backend.run(["sh", "-c", f"printf %s {shlex.quote(asked.to_json().decode())} | "
                                 f"{{ {write_request}; }}"])  # fmt: skip
                    time.sleep(0 if asked.run_id == run_id else 5)  # an earlier run's request: read, left alone
                return
            time.sleep(1)  # poll the log

    stopper = threading.Thread(target=stop_past_the_rung)
    stopper.start()
    with DAG(dag_id=unique_dag_id("train"), schedule=None, start_date=start_date(), catchup=False) as dag:
        from airflow_oellm.operators.submit import restart_policy

        SlurmSubmitOperator(task_id="train", **backend.conn, experiment=resolved, **restart_policy(resolved))
    dr = run_dag(dag)
    stopper.join()
    ti = tis(dr)["train"]
    assert ti.state == "skipped" and ti.try_number == 1, ti.state
    result = xcom(dr, "train", "result")
    assert result["classification"] == {"verdict": "stopped", "reason": reason, "exclude_nodes": [],
                                        "progress_free": False}  # fmt: skip
    assert 12 <= result["last_iteration"] < 600 and result["attempts"][0]["verdict"] == "stopped"
    status = json.loads(backend.run(["cat", task_status_path(exp.paths.output_dir, "train")]))
    assert status["state"] == "stopped" and status["reason"] == reason
    assert len(submitted(backend, exp)) == 1  # no retry
