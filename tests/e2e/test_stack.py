"""Through a real scheduler, triggerer, dag-processor and api-server, on the real dev cluster."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from airflow_oellm.config import load_sweep
from airflow_oellm.triggers.base import DEFAULT_DEFER_SETTLE_SECONDS
from tests.conftest import REPO
from tests.e2e.conftest import wait
from tests.shared_stack import add_file

FAKE = REPO / "tests" / "fixtures" / "fake_megatron.py"
HERE = Path(__file__).parent


def sweep(directory: Path, remote: str, name: str, args: str, extra: str = "", poll: int = 2) -> list[dict]:
    path = directory / f"{name}.yaml"
    path.write_text(
        f"defaults: [{{platform: devcluster}}]\n"
        f"project: {{name: {name}, base_output_dir: {remote}/runs}}\n"
        f"backend: {{python: python3, entrypoint: {remote}/fake_megatron.py, megatron_path: null, args: {{{args}}}}}\n"
        f"monitoring: {{poll_interval_seconds: {poll}, inactivity_threshold_seconds: 600}}\n{extra}"
    )
    return [e.resolved for e in load_sweep(path).experiments]


@pytest.fixture(scope="module")
def stack(shared_stack, dev_cluster, module_remote_dir, slurm_conn_id, tmp_path_factory):
    remote = module_remote_dir
    dev_cluster.upload(f"{remote}/fake_megatron.py", FAKE.read_text(), mode="0644")
    configs = tmp_path_factory.mktemp("e2e-sweeps")
    quick = "save_interval: 10, iter_seconds: 0.5"
    token = uuid.uuid4().hex[:6]  # job names unique to this run: sacct remembers earlier runs' jobs
    specs = {
        "dags": [
            {
                "dag_id": "e2e_sensors",
                "kind": "train_with_sensors",
                "conn_id": slurm_conn_id,
                "checkpoint": 20,
                "experiment": sweep(configs, remote, f"sensors_{token}", f"train_iters: 40, {quick}")[0],
            },
            {
                "dag_id": "e2e_restart",
                "kind": "train_with_sensors",
                "conn_id": slurm_conn_id,
                "checkpoint": 30,
                "experiment": sweep(configs, remote, f"restart_{token}", f"train_iters: 80, {quick}")[0],
            },
            {
                "dag_id": "e2e_kill",
                "kind": "train",
                "conn_id": slurm_conn_id,
                "experiment": sweep(configs, remote, f"kill_{token}", "train_iters: 600, iter_seconds: 1")[0],
            },
        ]
    }

    specs["dags"] += [
        {"dag_id": f"e2e_settle_{label}", "kind": "settle_probe", "tasks": SETTLE_PROBES, "hold": hold}
        | {"linger": linger}
        for label, hold, linger in (("none", 0, SLOW_EXIT), ("default", None, SLOW_EXIT), ("natural", None, 0))
    ]

    s = shared_stack
    add_file(s.dags, f"e2e_{token}.json", json.dumps(specs))
    wait(lambda: all(s.http("GET", f"/dags/{d['dag_id']}") for d in specs["dags"]), 240, "DAGs parsed", s)
    s.remote = remote
    s.token = token
    return s


SETTLE_PROBES = 6  # per hold; with two holds at once, three times the stack's 4 worker slots
SLOW_EXIT = 5.0  # seconds a loaded worker was seen to linger after deferring
EXECUTOR_SUCCESS = re.compile(
    r"Received executor event with state success for task instance TaskInstanceKey\(dag_id='(?P<dag>[^']+)', "
    r"task_id='(?P<task>[^']+)', run_id='(?P<run>[^']+)', try_number=(?P<try>\d+)"
)


def trigger_logs(stack, dag_id: str, task_id: str) -> str:
    files = sorted((stack.home / "logs").rglob(f"dag_id={dag_id}/**/task_id={task_id}/**/*trigger*.log")) + sorted(
        (stack.home / "logs").rglob(f"dag_id={dag_id}/**/task_id={task_id}/*trigger*")
    )
    return "\n".join(f.read_text(errors="replace") for f in dict.fromkeys(files))


def test_sensors_run_beside_the_training(stack):
    run_id = stack.trigger("e2e_sensors")
    assert stack.wait_run("e2e_sensors", run_id, 300) == "success", stack.explain("e2e_sensors", run_id)
    tis = {t["task_id"]: t for t in stack.task_instances("e2e_sensors", run_id)}
    assert {k: v["state"] for k, v in tis.items()} == {
        "train": "success",
        "checkpoint": "success",
        "progress": "success",
    }
    # the sensors finished while the training still ran: they waited beside it, not after it
    assert tis["checkpoint"]["end_date"] < tis["train"]["end_date"]
    assert tis["progress"]["end_date"] < tis["train"]["end_date"]
    assert stack.xcom("e2e_sensors", run_id, "checkpoint")["iteration"] == 20
    assert stack.xcom("e2e_sensors", run_id, "progress")["iteration"] == 20
    # the job's log streamed into the task's log while it ran (through the triggerer)
    log = trigger_logs(stack, "e2e_sensors", "train")
    assert "iteration       40/      40" in log and "[job " in log


def test_triggerer_restart_mid_run_loses_and_repeats_nothing(stack, dev_cluster):
    run_id = stack.trigger("e2e_restart")
    name = f"restart_{stack.token}"
    exp_dir = f"{stack.remote}/runs/{name}"

    def saved_offset() -> int:
        text = dev_cluster.ssh(f"cat {exp_dir}/.oellm/monitor/*.json 2>/dev/null || true").stdout
        return json.loads(text)["matcher"]["offset"] if text.strip() else 0

    wait(lambda: saved_offset() > 2000, 180, "the watch to save progress", stack, every=1)
    stack.restarting.add("triggerer")
    stack.kill("triggerer")
    killed_at = saved_offset()
    time.sleep(6)  # the outage: the triggerer stays down for several poll intervals
    stack.start("triggerer")
    stack.restarting.discard("triggerer")
    assert stack.wait_run("e2e_restart", run_id, 300) == "success", stack.explain("e2e_restart", run_id)
    result = stack.xcom("e2e_restart", run_id, "train")
    summary = result["summary"]
    assert summary["iterations_run"] == 80 and result["events"]["iteration"] == 80  # none lost, none twice
    assert summary["checkpoints_saved"] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert len(result["job_ids"]) == 1
    names = dev_cluster.ssh(["sacct", "-X", "-n", "-P", f"--name={name}", "-S", "now-1hour", "-o", "JobID"]).stdout
    assert names.split() == result["job_ids"]  # one job: the restart did not resubmit
    assert f"resuming the watch of job {result['job_ids'][0]} at byte" in trigger_logs(stack, "e2e_restart", "train")
    assert killed_at > 0


def test_marking_a_deferred_task_failed_cancels_its_job(stack, dev_cluster):
    run_id = stack.trigger("e2e_kill")
    name = f"kill_{stack.token}"

    def running_job() -> str | None:
        out = dev_cluster.ssh(["squeue", "-h", "--me", f"--name={name}", "-t", "RUNNING", "-o", "%A"]).stdout.split()
        deferred = any(t["state"] == "deferred" for t in stack.task_instances("e2e_kill", run_id))
        # the trigger runs in the triggerer (it streams the job's log): a kill now reaches its on_kill.
        # A task marked failed before the triggerer picked its trigger up is not covered (see issue notes).
        following = out and f"[job {out[0]}]" in trigger_logs(stack, "e2e_kill", "train")
        return out[0] if deferred and following else None

    job = wait(running_job, 180, "the training job running and its trigger following it", stack, every=2)
    q = urllib.parse.quote(run_id, safe="")
    stack.http("PATCH", f"/dags/e2e_kill/dagRuns/{q}/taskInstances/train", {"new_state": "failed"})

    def final_state() -> str | None:
        out = dev_cluster.ssh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.strip()
        return out if out and not out.startswith(("RUNNING", "PENDING")) else None

    assert wait(final_state, 120, f"job {job} to be cancelled", stack, every=2).startswith("CANCELLED")


def deferral_windows(stack, dag_id: str) -> list[float]:
    """Per deferral in the DAG's runs: seconds from the task's deferral (its log) until the scheduler
    received the deferring worker's exit from the executor (its log). A trigger firing inside this
    window is what the settle hold prevents."""
    received: dict[tuple[str, str, str], list[datetime]] = {}
    for line in (stack.home / "scheduler.log").read_text(errors="replace").splitlines():
        found = EXECUTOR_SUCCESS.search(line)
        if found and found["dag"] == dag_id:
            key = (found["task"], found["run"], found["try"])
            received.setdefault(key, []).append(datetime.fromisoformat(line.split(" ", 1)[0]))
    windows = []
    for log in sorted((stack.home / "logs" / f"dag_id={dag_id}").glob("run_id=*/task_id=*/attempt=*.log")):
        run = log.parent.parent.name.removeprefix("run_id=")
        task, attempt = log.parent.name.removeprefix("task_id="), log.stem.removeprefix("attempt=")
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event", "").startswith("Pausing task as DEFERRED"):
                deferred = datetime.fromisoformat(entry["timestamp"])
                after = [t for t in received.get((task, run, attempt), []) if t >= deferred]
                assert after, f"no executor event after {task}'s deferral"
                windows.append((min(after) - deferred).total_seconds())
                break
    return windows


def test_the_settle_hold_keeps_immediate_events_out_of_the_deferral_race(stack, reliability):
    """Airflow 3.3 fails a resumed task when the executor reads its deferring worker's exit after the
    resume was queued. With workers slow to exit, triggers that fire at once lose that race with no hold
    and never with the default `[oellm] defer_settle_seconds`; on workers as they are, the hold is
    longer than every window measured."""

    def run(*labels: str) -> dict[str, list[str]]:
        runs = {label: stack.trigger(f"e2e_settle_{label}") for label in labels}
        for label, run_id in runs.items():
            stack.wait_run(f"e2e_settle_{label}", run_id, 240)
        return {
            label: sorted(ti["state"] for ti in stack.task_instances(f"e2e_settle_{label}", run_id))
            for label, run_id in runs.items()
        }

    # the windows measured on an idle stack; then both holds at once, the worker slots full: the race
    # needs a resume queued before the stale exit is read, and is lost by 1 to 6 of 6 tasks a round
    natural = run("natural")["natural"]
    rounds = []
    while len(rounds) < 3 and not any("failed" in r["none"] for r in rounds):
        rounds.append(run("none", "default"))
    lost = sum(r["none"].count("failed") for r in rounds)
    assert lost, f"no task lost the race with no hold in {len(rounds)} rounds: {rounds}"
    assert natural == ["success"] * SETTLE_PROBES, natural
    assert all(r["default"] == ["success"] * SETTLE_PROBES for r in rounds), rounds
    slow = sorted(deferral_windows(stack, "e2e_settle_default"))
    windows = sorted(deferral_windows(stack, "e2e_settle_natural"))
    assert len(slow) == SETTLE_PROBES * len(rounds) and len(windows) == SETTLE_PROBES
    assert slow[0] >= SLOW_EXIT and slow[-1] < DEFAULT_DEFER_SETTLE_SECONDS, slow  # the hold outlasts them
    assert windows[-1] < DEFAULT_DEFER_SETTLE_SECONDS, windows
    reliability.record(
        "triggers that fire at once (SQLite, LocalExecutor)",
        f"workers lingering {SLOW_EXIT:g} s after deferring: with no hold {lost} of {SETTLE_PROBES * len(rounds)} "
        f"tasks failed as 'state changed externally', with the default {DEFAULT_DEFER_SETTLE_SECONDS:g} s hold "
        "none did. "
        f"Deferral to the executor reading the worker's exit, workers as they are: median "
        f"{windows[len(windows) // 2]:.1f} s, max {windows[-1]:.1f} s",
        duplicates=0,
        lost_events=0,
        race_window_median_seconds=round(windows[len(windows) // 2], 2),
        race_window_max_seconds=round(windows[-1], 2),
    )
