"""Processes die at the worst moment, on a real Airflow stack and the real dev cluster: a task's worker
and the scheduler right after `sbatch` returned (before the job id was saved), a worker as it starts to
judge a job its watch cancelled, a triggerer while twenty experiments are deferred, a triggerer stalled
until its trigger moves, and two runs of one experiment at once. Each ends with one job per attempt,
every iteration and checkpoint counted once, and the right final states."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from airflow_oellm.pause_points import flag_path
from tests.cluster.test_poller import job_info_rpcs, kill_sshd_and_sessions, start_sshd
from tests.conftest import REPO
from tests.e2e.conftest import wait
from tests.e2e.test_stack import sweep, trigger_logs
from tests.shared_stack import add_file
from tests.webhook import Receiver

FAKE = REPO / "tests" / "fixtures" / "fake_megatron.py"
FANOUT = 20
ORPHANS = ("f_orphan_task", "f_orphan_run", "f_orphan_cleared")
POSTGRES = ("f_pg_deferred", "f_pg_submitting")
OUTAGE_CALLBACK = "oellm_e2e_outage"
REFUSED = {"f_refused_wait": {"retries": 0}, "f_refused_give_up": {"retries": 1, "retry_delay": 40}}
HOLDS = ("orphans", "refused", "moved", "trig")  # the release files of the jobs held at iteration 5
RESUMED = re.compile(r"resuming the watch of job (\d+) at byte (\d+)")  # the trigger's log
pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(shared_stack, dev_cluster, module_remote_dir, slurm_conn_id, tmp_path_factory):
    remote = module_remote_dir
    dev_cluster.upload(f"{remote}/fake_megatron.py", FAKE.read_text(), mode="0644")
    configs = tmp_path_factory.mktemp("fault-sweeps")
    token = uuid.uuid4().hex[:6]
    steady = "save_interval: 10, iter_seconds: 1"

    def train(dag_id: str, name: str, iters: int, **extra) -> dict:
        experiment = sweep(configs, remote, f"{name}_{token}", f"train_iters: {iters}, {steady}")[0]
        return {"dag_id": dag_id, "kind": "train", "conn_id": slurm_conn_id, "experiment": experiment, **extra}

    # jobs that wait at iteration 5 until the test releases them (no job ends while its task is looked at)
    orphan_experiments = [
        sweep(
            configs,
            remote,
            f"{dag_id[2:]}_{token}",
            "train_iters: 20, save_interval: 10, iter_seconds: 0.5",
            f"platform: {{env: {{FAKE_HOLD_AT: 5, FAKE_HOLD_UNTIL: {remote}/orphans{token}.release}}}}\n",
        )[0]
        for dag_id in ORPHANS
    ]
    # the key refused for longer than the 10 minutes a refused key used to get, shortened by config
    outage_receiver = Receiver()  # the waiting one's sweep alerts a webhook of the outage too
    alerts = f"notifications: {{notify: [{{webhook: '{outage_receiver.url}', events: [outage]}}]}}\n"
    refused_experiments = [
        sweep(
            configs,
            remote,
            f"{dag_id[2:]}_{token}",
            "train_iters: 20, save_interval: 10, iter_seconds: 0.5",
            f"platform: {{max_outage: {max_outage}, {callback}env: {{FAKE_HOLD_AT: 5, "
            f"FAKE_HOLD_UNTIL: {remote}/refused{token}.release}}}}\n{more}",
        )[0]
        for dag_id, max_outage, callback, more in (
            # the waiting one tells a callback (a module in the stack's home, on every process's path)
            ("f_refused_wait", 900, f"on_outage: {{callback: {OUTAGE_CALLBACK}.record, after: 5}}, ", alerts),
            ("f_refused_give_up", 15, "", ""),
        )
    ]
    (shared_stack.home / f"{OUTAGE_CALLBACK}.py").write_text(
        "import json\nimport os\n\n\ndef record(notice):\n"
        "    with open(os.path.join(os.environ['AIRFLOW_HOME'], 'outage-notices.jsonl'), 'a') as out:\n"
        "        out.write(json.dumps(notice) + '\\n')\n"
    )
    # hangs at iteration 12, after its checkpoint at 10: its watch cancels it after 8 s without output
    # a job that waits at iteration 5 while its trigger moves between triggerers
    moved = sweep(
        configs,
        remote,
        f"moved_{token}",
        "train_iters: 20, save_interval: 10, iter_seconds: 0.5",
        f"platform: {{env: {{FAKE_HOLD_AT: 5, FAKE_HOLD_UNTIL: {remote}/moved{token}.release}}}}\n",
    )[0]
    hung = train("f_hung", "hung", 30, retries=2)
    hung["experiment"]["platform"]["env"]["FAKE_HANG_AT"] = 12
    hung["experiment"]["monitoring"]["inactivity_threshold_seconds"] = 8
    specs = {
        "dags": [
            train("f_worker", "worker", 60, retries=1),
            train("f_ended", "ended", 20, retries=1),
            hung,
            {"dag_id": "f_moved", "kind": "train", "conn_id": slurm_conn_id, "experiment": moved},
            train("f_scheduler", "scheduler", 50, retries=1),
            train("f_twice", "twice", 40, retries=0, max_active_runs=3),
            train("f_outage", "outage", 90, retries=0),
            *(train(dag_id, dag_id[2:], 60, retries=0) for dag_id in POSTGRES),
            train("f_secret", "secret", 20, secret_variables={"OELLM_TOKEN": "oellm_token"}),
            *(
                {"dag_id": dag_id, "kind": "train", "conn_id": slurm_conn_id, "experiment": experiment}
                for dag_id, experiment in zip(ORPHANS, orphan_experiments, strict=True)
            ),
            {"dag_id": "oellm_reconcile", "kind": "reconcile", "conn_id": slurm_conn_id, "dag_ids": list(ORPHANS)},
            *(
                {"dag_id": dag_id, "kind": "train", "conn_id": slurm_conn_id, "experiment": experiment, **extra}
                for (dag_id, extra), experiment in zip(REFUSED.items(), refused_experiments, strict=True)
            ),
            {
                "dag_id": "f_triggerer",
                "kind": "fanout",
                "conn_id": slurm_conn_id,
                "experiments": sweep(
                    configs,
                    remote,
                    "trig",
                    "train_iters: 40, save_interval: 10, iter_seconds: 0.5, seed: '${vars.i}'",
                    "sweep: {axes: {i: [" + ",".join(map(str, range(FANOUT))) + "]}, "
                    f"name_template: 'trig{token}_{{i}}'}}\n"
                    # every job waits at iteration 5 until the test releases it: none ends before all twenty
                    # tasks have deferred, however slowly a loaded machine starts them
                    f"platform: {{env: {{FAKE_HOLD_AT: 5, FAKE_HOLD_UNTIL: {remote}/trig{token}.release}}}}\n",
                ),
            },
        ]
    }

    s = shared_stack  # its configuration: tests/shared_stack.py's boot_spec_dags, production topology
    add_file(s.dags, f"faults_{token}.json", json.dumps(specs))
    wait(lambda: all(s.http("GET", f"/dags/{d['dag_id']}") for d in specs["dags"]), 240, "DAGs parsed", s)
    s.remote, s.token, s.specs = remote, token, {d["dag_id"]: d for d in specs["dags"]}
    s.outage_receiver = outage_receiver
    yield s
    outage_receiver.server.shutdown()
    for flag in list(s.pauses.iterdir()):  # nothing stays paused for its hour
        if flag.suffix not in (".armed", ".release"):
            flag.with_name(flag.name + ".release").touch()
    dev_cluster.ssh(["touch", *(f"{remote}/{hold}{token}.release" for hold in HOLDS)], check=False)


@pytest.fixture(autouse=True)
def holds_released_after_each_test(stack, dev_cluster) -> Iterator[None]:
    """Each test releases the jobs it holds, but one that failed first leaves them held, and twenty held jobs
    fill the cluster that the next tests' jobs wait for. After each test, the holds of every DAG that has run
    are released; a later test's hold stays, its DAG has not run yet."""
    yield
    held = {
        hold: [dag_id for dag_id, spec in stack.specs.items() if f"/{hold}{stack.token}.release" in json.dumps(spec)]
        for hold in HOLDS
    }
    ran = [hold for hold, dag_ids in held.items() if any(stack.runs(dag_id) for dag_id in dag_ids)]
    if ran:
        dev_cluster.ssh(["touch", *(f"{stack.remote}/{hold}{stack.token}.release" for hold in ran)], check=False)


def jobs_named(dev_cluster, name: str) -> list[str]:
    out = dev_cluster.ssh(["sacct", "-X", "-n", "-P", f"--name={name}", "-S", "now-2hours", "-o", "JobID"]).stdout
    return out.split()


def ti_state(stack, dag_id: str, run_id: str, task_id: str = "train") -> tuple[str | None, int]:
    ti = next(t for t in stack.task_instances(dag_id, run_id) if t["task_id"] == task_id)
    return ti["state"], ti["try_number"]


def armed(stack, dag_id: str) -> str:
    """Arm the pause after sbatch for the DAG's next submission, then trigger it."""
    flag = flag_path(stack.pauses, "after-sbatch", dag_id)
    flag.with_name(flag.name + ".armed").touch()
    return stack.trigger(dag_id)


def paused_submitter(stack, dag_id: str) -> tuple[int, str]:
    """Wait until the task's worker has run sbatch and sits at the pause point; its pid and the job."""
    flag = flag_path(stack.pauses, "after-sbatch", dag_id)
    wait(lambda: flag.exists() and flag.read_text().strip(), 240, f"{dag_id} to pause after sbatch", stack)
    experiment = stack.specs[dag_id]["experiment"]["experiment"]
    return int(flag.read_text()), experiment["name"]


def kill_right_after_sbatch(stack, dev_cluster, dag_id: str, kill) -> tuple[str, dict, list[str], float]:
    """Arm the pause after sbatch, trigger the DAG, `kill(pid)` the paused submitter (and whatever else),
    and wait for the run to succeed. Returns the job sbatch made, the training's result, the experiment's
    jobs in sacct, and the seconds from the kill until a retry followed the job again."""
    run_id = armed(stack, dag_id)
    pid, name = paused_submitter(stack, dag_id)
    (job,) = wait(lambda: jobs_named(dev_cluster, name), 60, "the submitted job in sacct", stack)
    killed = time.monotonic()
    kill(pid)
    recovered = wait(
        lambda: ti_state(stack, dag_id, run_id) == ("deferred", 2) and time.monotonic() - killed,
        300,
        "the retry to follow the job",
        stack,
    )
    assert stack.wait_run(dag_id, run_id, 600) == "success", stack.explain(dag_id, run_id)
    return job, stack.xcom(dag_id, run_id, "train"), jobs_named(dev_cluster, name), recovered


def ti_host(stack, dag_id: str, run_id: str, task_id: str = "train") -> str:
    """The component that ran the task's latest try (the stack's hostname callable names it)."""
    return next(t for t in stack.task_instances(dag_id, run_id) if t["task_id"] == task_id)["hostname"]


@contextlib.contextmanager
def killed(stack, *components: str) -> Iterator[None]:
    """kill -9 the components for the block's time; started again after it, as a supervisor would."""
    stack.restarting.update(components)
    for component in components:
        stack.kill(component)
    try:
        yield
    finally:
        for component in components:
            stack.start(component)
        stack.restarting.difference_update(components)


def test_celery_worker_killed_right_after_sbatch_the_retry_on_the_other_adopts_the_job(stack, dev_cluster, reliability):
    """The Celery worker running the task, killed with the task's process between sbatch and saving the job
    id: the task's heartbeat stops, the scheduler fails the try, and the retry runs on the other worker."""
    run_id = armed(stack, "f_worker")
    pid, name = paused_submitter(stack, "f_worker")
    (job,) = wait(lambda: jobs_named(dev_cluster, name), 60, "the submitted job in sacct", stack)
    victim = ti_host(stack, "f_worker", run_id)
    assert victim in ("worker-1", "worker-2"), victim
    with killed(stack, victim):
        os.kill(pid, signal.SIGKILL)  # the task process has its own process group: gone with its machine
        started = time.monotonic()
        recovered = wait(
            lambda: ti_state(stack, "f_worker", run_id) == ("deferred", 2) and time.monotonic() - started,
            300,
            "the retry to follow the job",
            stack,
        )
        survivor = ti_host(stack, "f_worker", run_id)
    assert stack.wait_run("f_worker", run_id, 600) == "success", stack.explain("f_worker", run_id)
    result, jobs = stack.xcom("f_worker", run_id, "train"), jobs_named(dev_cluster, name)
    assert survivor not in (victim, None), (victim, survivor)
    assert jobs == result["job_ids"] == [job], "a second job was submitted"
    assert [a["submission"] for a in result["attempts"]] == ["adopted"], result["attempts"]
    assert result["summary"]["iterations_run"] == result["last_iteration"] == 60
    reliability.record(
        "Celery worker killed after sbatch",
        "the scheduler failed the silent try; the retry, on the other worker, found the job by its comment and "
        "followed it; no second sbatch",
        duplicates=len(jobs) - 1,
        lost_events=60 - result["events"]["iteration"],
        recover_seconds=recovered,
        task_instance_heartbeat_timeout_seconds=20,
    )


def test_a_retry_takes_the_result_of_a_job_that_ended_while_no_try_followed_it(stack, dev_cluster, reliability):
    """The worker is held right after sbatch (the job id not yet saved) until its job has COMPLETED, then
    killed: the retry finds the earlier try's job ended and judged by no try, and takes its result."""
    run_id = armed(stack, "f_ended")
    pid, name = paused_submitter(stack, "f_ended")
    (job,) = wait(lambda: jobs_named(dev_cluster, name), 60, "the submitted job in sacct", stack)

    def job_state() -> str:
        return dev_cluster.ssh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.strip()

    wait(lambda: job_state() == "COMPLETED", 120, f"job {job} COMPLETED while its try is held", stack)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert stack.wait_run("f_ended", run_id, 600) == "success", stack.explain("f_ended", run_id)
    taken = time.monotonic() - killed
    result = stack.xcom("f_ended", run_id, "train")
    jobs = jobs_named(dev_cluster, name)
    assert jobs == result["job_ids"] == [job], "a second job was submitted"
    assert [(a["try"], a["submission"]) for a in result["attempts"]] == [(2, "ended")], result["attempts"]
    assert result["summary"]["iterations_run"] == result["last_iteration"] == 20
    reliability.record(
        "worker killed after sbatch, its job ended before the retry",
        "the retry found the earlier try's job ended and judged by no try, and took its result; no second sbatch",
        duplicates=len(jobs) - 1,
        lost_events=20 - result["events"]["iteration"],
        recover_seconds=taken,
    )


def test_a_retry_judges_a_job_its_watch_cancelled_before_the_killed_worker_could(stack, dev_cluster, reliability):
    """The watch cancels a hung job, and the worker is killed as it starts to judge it. The retry finds the
    job CANCELLED, and by the watch's saved state cancelled by the watch, not by a person: it judges it a
    hang, and the next try resumes from the checkpoint with a new job."""
    flag = flag_path(stack.pauses, "before-judging", "f_hung")
    flag.with_name(flag.name + ".armed").touch()
    run_id = stack.trigger("f_hung")
    wait(lambda: flag.exists() and flag.read_text().strip(), 300, "the first judging to pause", stack, every=2)
    name = stack.specs["f_hung"]["experiment"]["experiment"]["name"]
    (job,) = jobs_named(dev_cluster, name)
    killed = time.monotonic()
    os.kill(int(flag.read_text()), signal.SIGKILL)
    assert stack.wait_run("f_hung", run_id, 600) == "success", stack.explain("f_hung", run_id)
    recovered = time.monotonic() - killed
    result, jobs = stack.xcom("f_hung", run_id, "train"), jobs_named(dev_cluster, name)
    # try 1 recorded its job when it deferred, and died before judging it: its record has no verdict
    assert len(result["attempts"]) == 3, (result["attempts"], stack.explain("f_hung", run_id))
    unjudged, judged, resumed = result["attempts"]
    assert (unjudged["try"], unjudged["job_id"], unjudged.get("verdict")) == (1, job, None), result["attempts"]
    assert (judged["try"], judged["submission"], judged["job_id"]) == (2, "ended", job), judged
    assert judged["verdict"] == "retry" and judged["reason"].startswith("hang"), judged
    assert (resumed["try"], resumed["submission"], resumed["verdict"]) == (3, "submitted", "success"), resumed
    assert resumed["resumed_from"] == judged["checkpoint_after"] >= 10, (judged, resumed)
    assert jobs == result["job_ids"] == [job, resumed["job_id"]], (jobs, result["job_ids"])
    reliability.record(
        "worker killed before judging a job its watch cancelled (a hang)",
        "the retry read the watch's saved state (cancelled by the watch, not a person), judged the job a hang, "
        "and the next try resumed from its checkpoint with a new job",
        duplicates=len(jobs) - len({a["job_id"] for a in result["attempts"]}),
        lost_events=30 - result["last_iteration"],
        recover_seconds=recovered,
    )


def test_the_scheduler_that_queued_a_task_killed_the_other_carries_it_on(stack, dev_cluster, reliability):
    """The task sits right after sbatch; the scheduler that queued it is killed, then the task goes on: the
    other scheduler takes its deferral, its trigger's event and its end. One job, one try."""
    run_id = armed(stack, "f_scheduler")
    _, name = paused_submitter(stack, "f_scheduler")
    ((victim,),) = stack.sql(
        "SELECT j.hostname FROM task_instance ti JOIN job j ON j.id = ti.queued_by_job_id "
        "WHERE ti.dag_id = %s AND ti.run_id = %s AND ti.task_id = 'train'",
        "f_scheduler",
        run_id,
    )
    assert victim in ("scheduler-1", "scheduler-2"), victim
    with killed(stack, victim):
        started = time.monotonic()
        flag = flag_path(stack.pauses, "after-sbatch", "f_scheduler")
        flag.with_name(flag.name + ".release").touch()  # the task saves its job id and defers
        assert stack.wait_run("f_scheduler", run_id, 600) == "success", stack.explain("f_scheduler", run_id)
        finished = time.monotonic() - started
    result, jobs = stack.xcom("f_scheduler", run_id, "train"), jobs_named(dev_cluster, name)
    assert jobs == result["job_ids"] and len(jobs) == 1, "a second job was submitted"
    assert [a["submission"] for a in result["attempts"]] == ["submitted"], result["attempts"]
    assert ti_state(stack, "f_scheduler", run_id) == ("success", 1)  # no retry was needed
    assert result["summary"]["iterations_run"] == result["last_iteration"] == 50
    reliability.record(
        "the scheduler that queued a task killed",
        "the other scheduler took the task's deferral, its trigger's event and its end; one job, one try",
        duplicates=len(jobs) - 1,
        lost_events=50 - result["events"]["iteration"],
        run_seconds_after_kill=round(finished, 1),
    )


def watch_states(dev_cluster, remote: str, prefix: str) -> dict[int, dict]:
    """Per sweep index, the watch state its trigger saved (jobs that have saved one)."""
    script = (
        f"for d in {remote}/runs/{prefix}*; do f=$(ls $d/.oellm/monitor/*.json 2>/dev/null | head -n 1);"
        f' [ -n "$f" ] && printf "%s %s\\n" "${{d##*_}}" "$(tr -d "\\n" < "$f")"; done; true'
    )
    states = {}
    for line in dev_cluster.ssh(script).stdout.splitlines():
        index, _, state = line.partition(" ")
        states[int(index)] = json.loads(state)
    return states


def monitor_offsets(dev_cluster, remote: str, prefix: str) -> dict[int, int]:
    """Per sweep index, the log offset its trigger saved."""
    return {i: s["matcher"]["offset"] for i, s in watch_states(dev_cluster, remote, prefix).items()}


def trigger_holders(stack, dag_id: str, run_id: str) -> dict[int, str]:
    """Per map index of a deferred task, the triggerer that holds its trigger (by its hostname)."""
    rows = stack.sql(
        "SELECT ti.map_index, j.hostname FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id "
        "JOIN job j ON j.id = t.triggerer_id WHERE ti.dag_id = %s AND ti.run_id = %s AND ti.state = 'deferred'",
        dag_id,
        run_id,
    )
    return dict(rows)


def progress_of(stack, dag_id: str, run_id: str, map_index: int) -> dict | None:
    """The `progress` XCom of one mapped task's watch, or None before its first judged poll."""
    try:
        return stack.xcom(dag_id, run_id, "train", "progress", map_index=map_index)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def poll_load(stack, dev_cluster, dag_id: str, run_id: str, window: float = 12.0) -> tuple[dict[int, str], int, float]:
    """Which triggerer holds each trigger, and slurmctld's job-information RPCs in `window` seconds (poll
    intervals of 2 s) while no trigger moved. A loaded triggerer that misses its heartbeats loses its
    triggers to the other, which restores each at once (a cycle of its own): a window with a move is
    measured again, after the holders have been the same for three poll intervals."""
    seen: dict[str, Any] = {"holders": None, "since": 0.0}

    def settled() -> dict[int, str] | None:
        holders = trigger_holders(stack, dag_id, run_id)
        if holders != seen["holders"]:
            seen.update(holders=holders, since=time.monotonic())
        return holders if time.monotonic() - seen["since"] >= 6 else None

    for _ in range(3):
        seen["holders"] = None
        holders = wait(settled, 120, "the triggers to stay where they are for 6 s", stack)
        before, started = job_info_rpcs(dev_cluster), time.monotonic()
        time.sleep(window)  # the measured window
        rpcs, intervals = job_info_rpcs(dev_cluster) - before, (time.monotonic() - started) / 2
        if trigger_holders(stack, dag_id, run_id) == holders:
            return holders, rpcs, intervals
    raise AssertionError(f"triggers moved between triggerers in three windows of {window} s")


def test_triggerer_killed_with_twenty_deferred_the_other_takes_over_at_the_saved_bytes(stack, dev_cluster, reliability):
    """Twenty experiments deferred over two triggerers. Before: the status commands per poll interval are
    the number of triggerers that hold watches, not of jobs. Then the one holding more is killed -9: the
    other takes its triggers over and resumes each watch at the byte the dead one saved."""
    prefix = f"trig{stack.token}_"
    run_id = stack.trigger("f_triggerer")

    def deferred() -> set[int]:
        return {t["map_index"] for t in stack.task_instances("f_triggerer", run_id) if t["state"] == "deferred"}

    wait(lambda: len(deferred()) == FANOUT, 300, f"{FANOUT} deferred tasks", stack, every=3)
    wait(lambda: len(trigger_holders(stack, "f_triggerer", run_id)) == FANOUT, 60, "every trigger running", stack)
    wait(lambda: sum(o > 0 for o in monitor_offsets(dev_cluster, stack.remote, prefix).values()) >= 4, 60, "watches")
    # every watch has judged a poll (its progress is published): none restores its state in the window below
    wait(lambda: all(progress_of(stack, "f_triggerer", run_id, i) for i in range(FANOUT)), 60, "every progress", stack)
    # the poll load: slurmctld's own count of job-information requests over a window of the held jobs
    holders, rpcs, intervals = poll_load(stack, dev_cluster, "f_triggerer", run_id)
    polling = len(set(holders.values()))
    assert rpcs <= polling * (intervals + 1), (rpcs, intervals, holders)  # per triggerer, never per job
    victim = max(sorted(set(holders.values())), key=lambda h: list(holders.values()).count(h))
    survivor = {"triggerer-1": "triggerer-2", "triggerer-2": "triggerer-1"}[victim]
    moved = {i for i, h in holders.items() if h == victim}
    with killed(stack, victim):
        killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
        time.sleep(6)  # a poll's remote command may save state after its client died: read after it
        # the watches of the dead triggerer that were reading a running job's log, as it left them
        at_kill = {
            i: s["matcher"]["offset"]
            for i, s in watch_states(dev_cluster, stack.remote, prefix).items()
            if i in moved and s["matcher"]["offset"] > 0 and not s.get("final_status")
        }
        assert at_kill, f"no watch of {victim} was reading a running job when it was killed"
        taken = wait(
            lambda: (
                set(trigger_holders(stack, "f_triggerer", run_id).values()) == {survivor}
                and time.monotonic() - killed_at
            ),
            120,
            f"{survivor} to hold every trigger",
            stack,
        )
        dev_cluster.ssh(["touch", f"{stack.remote}/trig{stack.token}.release"])  # the held jobs train on
        # judged on outcomes, not on a moment caught between two looks: a watch may read to its job's end at once
        assert stack.wait_run("f_triggerer", run_id, 900) == "success", stack.explain("f_triggerer", run_id)
    resumed: dict[str, list[tuple[int, datetime]]] = {}  # per job: (byte, when) of each resumed watch
    for line in trigger_logs(stack, "f_triggerer", "train").splitlines():
        if "resuming the watch of job" in line:
            entry = json.loads(line)
            job, byte = RESUMED.search(entry["event"]).groups()
            resumed.setdefault(job, []).append((int(byte), datetime.fromisoformat(entry["timestamp"])))
    final = monitor_offsets(dev_cluster, stack.remote, prefix)
    duplicates = lost = 0
    recovered = 0.0  # from the kill until the last watch running at the kill was followed again
    for i in range(FANOUT):
        result = stack.xcom("f_triggerer", run_id, "train", map_index=i)
        summary, jobs = result["summary"], jobs_named(dev_cluster, f"{prefix}{i}")
        assert jobs == result["job_ids"] and len(jobs) == 1, (i, jobs, result["job_ids"])
        assert summary["iterations_run"] == 40 and result["events"]["iteration"] == 40, (i, summary)
        assert summary["checkpoints_saved"] == [10, 20, 30, 40], (i, summary)
        if i in at_kill:  # the other triggerer went on from the byte the dead one saved, never back
            after = [(byte, when) for byte, when in resumed.get(jobs[0], []) if when >= killed_wall]
            assert after and after[0][0] == at_kill[i], (i, at_kill[i], resumed.get(jobs[0]))
            assert all(byte >= at_kill[i] for byte, _ in after) and final[i] >= at_kill[i], (i, at_kill[i], final[i])
            recovered = max(recovered, (after[0][1] - killed_wall).total_seconds())
        duplicates += len(jobs) - 1
        lost += 40 - result["events"]["iteration"]
    reliability.record(
        f"one of two triggerers killed with {FANOUT} deferred",
        f"the other took over the dead one's {len(moved)} triggers after {taken:.0f} s and resumed every watch at "
        "its saved byte; every job finished once",
        duplicates=duplicates,
        lost_events=lost,
        recover_seconds=recovered,
        triggers_moved=len(moved),
        running_watches_at_kill=len(at_kill),
        triggerer_health_check_threshold_seconds=15,
    )
    reliability.record(
        f"two triggerers following {FANOUT} jobs on one cluster",
        f"{rpcs} job-information RPCs in {intervals:.1f} poll intervals with {polling} triggerer(s) holding "
        "watches: one status command per triggerer per interval, whatever the number of jobs",
        job_info_rpcs_per_interval=round(rpcs / intervals, 2),
        triggerers_holding_watches=polling,
        jobs=FANOUT,
    )


def test_a_trigger_moved_off_a_stalled_triggerer_never_cancels_its_job(stack, dev_cluster, reliability):
    """The triggerer holding a training's trigger stalls (SIGSTOP) past the health-check threshold, and the
    other takes the trigger over. Woken up, the first finds the trigger gone from its share and Airflow
    cancels it there as if a user had acted, calling `on_kill`: the task is still deferred, so the job
    goes on, and the other triggerer follows it to its end."""
    run_id = stack.trigger("f_moved")
    name = stack.specs["f_moved"]["experiment"]["experiment"]["name"]
    holder = wait(lambda: trigger_holders(stack, "f_moved", run_id).get(-1), 300, "the trigger running", stack)
    (job,) = wait(lambda: jobs_named(dev_cluster, name), 60, "the job in sacct", stack)

    def job_state() -> str:
        return dev_cluster.ssh(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip()

    # held at iteration 5 once it runs: it may wait for a free CPU beside the other tests' jobs first
    wait(lambda: job_state() == "RUNNING", 240, f"job {job} to run", stack, every=2)
    stalled = stack.procs[holder].pid
    os.killpg(stalled, signal.SIGSTOP)
    try:
        stalled_at = time.monotonic()
        taken = wait(
            lambda: (
                trigger_holders(stack, "f_moved", run_id).get(-1) not in (None, holder)
                and time.monotonic() - stalled_at
            ),
            120,
            "the other triggerer to take the trigger",
            stack,
        )
    finally:
        os.killpg(stalled, signal.SIGCONT)
    wait(
        lambda: "trigger moved to another triggerer" in trigger_logs(stack, "f_moved", "train"),
        120,
        f"{holder}, woken, to let go of the trigger through on_kill",
        stack,
    )
    state = job_state()
    assert state == "RUNNING", f"job {job} is {state!r} after on_kill"
    dev_cluster.ssh(["touch", f"{stack.remote}/moved{stack.token}.release"])
    assert stack.wait_run("f_moved", run_id, 600) == "success", stack.explain("f_moved", run_id)
    result, jobs = stack.xcom("f_moved", run_id, "train"), jobs_named(dev_cluster, name)
    assert jobs == result["job_ids"] == [job], (jobs, result["job_ids"])
    assert result["summary"]["iterations_run"] == result["events"]["iteration"] == 20, result["summary"]
    reliability.record(
        "triggerer stalled past the health check, its trigger moved",
        f"the other took the trigger after {taken:.0f} s; the woken one's on_kill found the task still deferred "
        "and left the job running; it finished once, every iteration counted once",
        duplicates=len(jobs) - 1,
        lost_events=20 - result["events"]["iteration"],
        recover_seconds=taken,
        triggerer_health_check_threshold_seconds=15,
    )


def test_two_runs_of_one_experiment_never_share_its_output_dir(stack, dev_cluster, reliability):
    name = stack.specs["f_twice"]["experiment"]["experiment"]["name"]
    first, second = stack.trigger("f_twice"), stack.trigger("f_twice")  # at once
    wait(lambda: jobs_named(dev_cluster, name), 120, "a job of the experiment", stack)
    third = stack.trigger("f_twice")  # again, while one is active
    outcomes = {run: stack.wait_run("f_twice", run, 600) for run in (first, second, third)}
    assert sorted(outcomes.values()) == ["failed", "failed", "success"], outcomes
    assert len(jobs_named(dev_cluster, name)) == 1
    for run, state in outcomes.items():
        if state == "failed":
            assert "not submitting a second job there" in stack.explain("f_twice", run)
    reliability.record(
        "two runs at once, and a re-trigger while one is active",
        "the first run's job kept the output directory; the others failed at submission, naming the job",
        duplicates=len(jobs_named(dev_cluster, name)) - 1,
    )


SLURMCTLD_PID = Path("/run/slurm/slurmctld.pid")


def restart_slurmctld(down_for: float) -> None:
    """Stop the controller (squeue and sacct fail meanwhile), then start it again from its saved state."""
    os.kill(int(SLURMCTLD_PID.read_text()), signal.SIGTERM)
    time.sleep(down_for)  # the outage itself
    subprocess.run(["/usr/sbin/slurmctld"], check=True, stdin=subprocess.DEVNULL, capture_output=True)


def test_ssh_and_slurmctld_outages_cause_no_false_state_and_no_failure(stack, dev_cluster, reliability):
    """sshd (and every session) killed for three poll intervals, then slurmctld down for three."""
    run_id = stack.trigger("f_outage")
    name = stack.specs["f_outage"]["experiment"]["experiment"]["name"]
    out = stack.specs["f_outage"]["experiment"]["experiment"]["output_dir"]

    def offset() -> int:
        text = dev_cluster.ssh(f"cat {out}/.oellm/monitor/*.json 2>/dev/null || true", check=False).stdout
        return json.loads(text)["matcher"]["offset"] if text.strip() else 0

    wait(lambda: offset() > 1000, 180, "the watch to follow the job", stack)
    outages = {}
    for what, fault in (
        # the outages last three poll intervals
        ("sshd", lambda: (kill_sshd_and_sessions(), time.sleep(6), start_sshd())),
        ("slurmctld", lambda: restart_slurmctld(6)),
    ):
        before = offset()
        fault()
        back = time.monotonic()
        wait(lambda before=before: offset() > before, 120, f"polling to resume after the {what} outage", stack)
        outages[what] = time.monotonic() - back
    assert stack.wait_run("f_outage", run_id, 600) == "success", stack.explain("f_outage", run_id)
    result = stack.xcom("f_outage", run_id, "train")
    jobs = jobs_named(dev_cluster, name)
    assert jobs == result["job_ids"] and len(jobs) == 1
    assert result["final_state"] == "COMPLETED" and len(result["attempts"]) == 1
    assert result["summary"]["iterations_run"] == 90 and result["events"]["iteration"] == 90
    # the outages were seen, and ridden out: the watch's notice once polls failed for its threshold, or the
    # poller's warning of each failed poll (a triggerer that missed heartbeats under load loses the trigger
    # to the other, whose watch starts counting failures anew)
    logs = trigger_logs(stack, "f_outage", "train")
    assert "cannot reach" in logs or re.search(r"poll of 1 job\(s\) on \S+ failed", logs), logs[-3000:]
    for what, happened in (
        ("sshd and every SSH session killed for 3 poll intervals", "polls failed and were retried; no state"),
        ("slurmctld down for 3 poll intervals", "squeue failed transiently; no false final state, no retry"),
    ):
        key = what.split()[0]
        reliability.record(
            what,
            happened,
            duplicates=len(jobs) - 1,
            lost_events=90 - result["events"]["iteration"],
            recover_seconds=outages[key],
        )


def test_a_secret_is_in_no_file_log_or_xcom_and_state_files_are_private(stack, dev_cluster, reliability):
    run_id = stack.trigger("f_secret")
    assert stack.wait_run("f_secret", run_id, 300) == "success", stack.explain("f_secret", run_id)
    out = stack.specs["f_secret"]["experiment"]["experiment"]["output_dir"]
    token = stack.secret.split(";")[0]
    remote = dev_cluster.ssh(f"grep -rlF {token} {out} || true").stdout.split()
    local = [str(p) for p in stack.home.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    dump = stack.database_dump()  # PostgreSQL's rows: XCom, task state, trigger arguments, logs' metadata
    assert b"f_secret" in dump and token.encode() not in dump
    assert remote == [] and local == [], (remote, local)  # the Airflow logs, the job's tree
    assert dev_cluster.ssh(f"find {out} -name PWNED").stdout.strip() == ""
    # what the provider wrote: the script 0700, state, status and submission records 0600, directories 0700
    loose = dev_cluster.ssh(
        f"find {out}/scripts {out}/.oellm \\( -type f ! -name '*.lock' -perm /077 \\)"
        f" -o \\( -name '*.sbatch' ! -perm 700 \\) -o \\( -type d -path '*/.oellm*' -perm /077 \\)"
    ).stdout.split()
    assert loose == [], loose
    reliability.record(
        "a secret from an Airflow Variable",
        "in no file of the job's directory or of the Airflow home (logs), no row of the database (XCom), "
        "nowhere readable",
        files_holding_the_secret=len(remote) + len(local),
    )


def test_jobs_whose_task_was_stopped_while_no_triggerer_ran_are_cancelled_by_the_reconcile_dag(
    stack, dev_cluster, reliability
):
    """With both triggerers down: one task marked failed, one DAG run marked failed, one task cleared.
    `oellm_reconcile` cancels the first two jobs and keeps the third, which the cleared task's next try
    adopts; the failed task, cleared afterwards, trains again with a new job (a cancelled job is not taken)."""
    runs = {dag_id: stack.trigger(dag_id) for dag_id in ORPHANS}
    names = {dag_id: stack.specs[dag_id]["experiment"]["experiment"]["name"] for dag_id in ORPHANS}

    def all_held() -> dict[str, str] | None:
        if not all(ti_state(stack, d, r)[0] == "deferred" for d, r in runs.items()):
            return None
        running = {
            d: dev_cluster.ssh(["squeue", "-h", "--me", f"--name={n}", "-t", "RUNNING", "-o", "%A"]).stdout.strip()
            for d, n in names.items()
        }
        return running if all(running.values()) else None

    jobs = wait(all_held, 240, "three deferred tasks and their running jobs", stack, every=3)
    with contextlib.ExitStack() as down:
        # on the way out (last in, first out): the triggerers start again, then the held jobs go on
        down.callback(dev_cluster.ssh, ["touch", f"{stack.remote}/orphans{stack.token}.release"])
        down.enter_context(killed(stack, "triggerer-1", "triggerer-2"))  # no triggerer runs a trigger now
        q = {d: urllib.parse.quote(r, safe="") for d, r in runs.items()}
        stack.http(
            "PATCH", f"/dags/f_orphan_task/dagRuns/{q['f_orphan_task']}/taskInstances/train", {"new_state": "failed"}
        )
        stack.http("PATCH", f"/dags/f_orphan_run/dagRuns/{q['f_orphan_run']}", {"state": "failed"})
        clear = {"dry_run": False, "only_failed": False, "task_ids": ["train"], "dag_run_id": runs["f_orphan_cleared"]}
        stack.http("POST", "/dags/f_orphan_cleared/clearTaskInstances", clear)
        # the cleared task's next try runs on a worker (no triggerer needed), adopts the job and defers
        wait(
            lambda: ti_state(stack, "f_orphan_cleared", runs["f_orphan_cleared"]) == ("deferred", 2),
            180,
            "the cleared task's next try to defer",
            stack,
        )
        started = time.monotonic()
        reconcile = stack.trigger("oellm_reconcile")
        assert stack.wait_run("oellm_reconcile", reconcile, 300) == "success", stack.explain(
            "oellm_reconcile", reconcile
        )
        task_id = next(t["task_id"] for t in stack.task_instances("oellm_reconcile", reconcile))
        cancelled = stack.xcom("oellm_reconcile", reconcile, task_id)

        def state(job: str) -> str:
            return dev_cluster.ssh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.strip()

        gone = wait(
            lambda: all(state(jobs[d]).startswith("CANCELLED") for d in ORPHANS[:2]) and time.monotonic() - started,
            60,
            "both orphaned jobs cancelled",
            stack,
        )
        assert sorted(c["job_id"] for c in cancelled) == sorted([jobs["f_orphan_task"], jobs["f_orphan_run"]]), (
            cancelled
        )
        reasons = {c["job_id"]: c["reason"] for c in cancelled}
        assert reasons[jobs["f_orphan_task"]].endswith("/ train is failed"), reasons
        assert reasons[jobs["f_orphan_run"]].endswith("/ train is failed"), (
            reasons
        )  # Airflow fails a run's deferred task
        assert state(jobs["f_orphan_cleared"]) == "RUNNING"  # its task follows it again
    cleared = runs["f_orphan_cleared"]
    assert stack.wait_run("f_orphan_cleared", cleared, 300) == "success", stack.explain("f_orphan_cleared", cleared)
    result = stack.xcom("f_orphan_cleared", cleared, "train")
    assert jobs_named(dev_cluster, names["f_orphan_cleared"]) == [jobs["f_orphan_cleared"]]
    assert [(a["job_id"], a["submission"]) for a in result["attempts"]] == [
        (jobs["f_orphan_cleared"], "submitted"),
        (jobs["f_orphan_cleared"], "adopted"),
    ], result["attempts"]
    # the task marked failed, cleared now: its job was cancelled with it, so this try trains again
    failed = runs["f_orphan_task"]
    stack.http(
        "POST",
        "/dags/f_orphan_task/clearTaskInstances",
        {"dry_run": False, "only_failed": True, "task_ids": ["train"], "dag_run_id": failed},
    )
    wait(lambda: ti_state(stack, "f_orphan_task", failed)[1] == 2, 60, "the cleared task's second try", stack)
    assert stack.wait_run("f_orphan_task", failed, 300) == "success", stack.explain("f_orphan_task", failed)
    again = jobs_named(dev_cluster, names["f_orphan_task"])
    assert len(again) == 2 and again[0] == jobs["f_orphan_task"], again
    result = stack.xcom("f_orphan_task", failed, "train")
    # it resumed from the checkpoint the cancelled job saved on its way out
    assert result["job_ids"][-1] == again[1] and result["last_iteration"] == 20, result
    assert [a["submission"] for a in result["attempts"]] == ["submitted", "submitted"], result["attempts"]
    reliability.record(
        "task / DAG run marked failed while no triggerer ran",
        "oellm_reconcile cancelled both jobs; a cleared task's next try adopted its job; the failed task, "
        "cleared later, trained again with a new job",
        duplicates=0,
        recover_seconds=gone,
        orphans_cancelled=len(cancelled),
        jobs_kept=1,
    )


def refuse_the_key(dev_cluster) -> Path:
    """sshd refuses the connection's key from now on (as after a certificate expired): the authorized keys
    moved away, every session ended. Returns the moved file, to put back."""
    keys = Path(pwd.getpwnam(dev_cluster.env["SLURM_DEV_SSH_USER"]).pw_dir) / ".ssh" / "authorized_keys"
    refused = keys.with_name("authorized_keys.refused")
    keys.rename(refused)
    kill_sshd_and_sessions()
    start_sshd()
    return refused


def test_a_refused_key_is_waited_out_for_max_outage_and_the_watch_carries_on(stack, dev_cluster, reliability):
    """The key refused for about a minute: the watch with `platform.max_outage: 900` waits, says since when and
    why (log and progress), and carries on at its byte; the one with 15 s gives up, and its retry adopts the job."""
    runs = {dag_id: stack.trigger(dag_id) for dag_id in REFUSED}
    names = {dag_id: stack.specs[dag_id]["experiment"]["experiment"]["name"] for dag_id in REFUSED}

    def following() -> bool:
        progress = [stack.xcom_or_none(d, r, "train", "progress") or {} for d, r in runs.items()]
        return all(p.get("job_state") == "RUNNING" for p in progress)

    wait(following, 240, "both watches following a running job", stack, every=3)
    jobs = {dag_id: jobs_named(dev_cluster, name) for dag_id, name in names.items()}
    assert all(len(j) == 1 for j in jobs.values()), jobs
    refused = refuse_the_key(dev_cluster)
    started = time.monotonic()
    try:
        wait(
            lambda: ti_state(stack, "f_refused_give_up", runs["f_refused_give_up"])[0] == "up_for_retry",
            180,
            "the 15 s watch to give up",
            stack,
        )
        outage = wait(
            lambda: (stack.xcom_or_none("f_refused_wait", runs["f_refused_wait"], "train", "progress") or {}).get(
                "outage"
            ),
            60,
            "the outage in the waiting task's progress",
            stack,
        )
        assert ti_state(stack, "f_refused_wait", runs["f_refused_wait"]) == ("deferred", 1)
        refused_for = time.monotonic() - started
    finally:
        refused.rename(refused.with_name("authorized_keys"))
    restored = time.monotonic()
    assert outage["kind"] == "authentication" and outage["cluster"] == stack.specs["f_refused_wait"]["conn_id"], outage
    log = trigger_logs(stack, "f_refused_wait", "train")
    assert "authentication failed (renew your SSH certificate or key" in log
    back = wait(
        lambda: (
            "reached" in trigger_logs(stack, "f_refused_wait", "train").split("authentication failed")[-1]
            and time.monotonic() - restored
        ),
        400,
        "the waiting watch to reach the cluster again",
        stack,
    )
    give_up_run = runs["f_refused_give_up"]
    wait(lambda: ti_state(stack, "f_refused_give_up", give_up_run) == ("deferred", 2), 120, "the retry to adopt", stack)
    dev_cluster.ssh(["touch", f"{stack.remote}/refused{stack.token}.release"])  # the held jobs train on
    for dag_id, run_id in runs.items():
        assert stack.wait_run(dag_id, run_id, 400) == "success", stack.explain(dag_id, run_id)
        assert jobs_named(dev_cluster, names[dag_id]) == jobs[dag_id], "a second job was submitted"
    notices = [json.loads(line) for line in (stack.home / "outage-notices.jsonl").read_text().splitlines()]
    assert [n["event"] for n in notices] == ["started", "ended"], notices  # once each, in the triggerer
    assert notices[0]["outage"]["kind"] == "authentication" and notices[0]["outage"]["watches"] >= 1, notices
    # and its sweep's notifiers heard the same two, from the triggerer, each with the sweep's page
    alerts = [body["alert"] for body in stack.outage_receiver.received]
    assert [(a["event"], a["reason"]) for a in alerts] == [("outage", n["message"]) for n in notices], alerts
    sweep_name = stack.specs["f_refused_wait"]["experiment"]["experiment"]["sweep"]
    assert all(a["sweep"] == sweep_name and a["experiment"] is None for a in alerts), alerts
    assert all(a["link"].endswith(f"/oellm/sweeps/{sweep_name}") for a in alerts), alerts
    waited = stack.xcom("f_refused_wait", runs["f_refused_wait"], "train")
    assert [a["submission"] for a in waited["attempts"]] == ["submitted"] and waited["events"]["iteration"] == 20
    gave_up = stack.xcom("f_refused_give_up", runs["f_refused_give_up"], "train")
    assert [a["submission"] for a in gave_up["attempts"]] == ["submitted", "adopted"], gave_up["attempts"]
    assert "gave up after platform.max_outage (15 s)" in trigger_logs(stack, "f_refused_give_up", "train") + "".join(
        p.read_text() for p in (stack.home / "logs").rglob("dag_id=f_refused_give_up/**/attempt=1.log")
    )
    reliability.record(
        "SSH key refused beyond one watch's platform.max_outage (900 s and 15 s)",
        "the 900 s watch waited, logged and published the authentication outage, told its callback once at "
        "its start and once at its end, and carried on at its byte; the 15 s one gave up and its retry "
        "adopted the job",
        duplicates=0,
        lost_events=20 - waited["events"]["iteration"],
        recover_seconds=back,
        refused_seconds=round(refused_for),
    )


def test_postgresql_restarted_mid_run_loses_no_task_and_repeats_none(stack, dev_cluster, reliability):
    """The metadata database stops (fast shutdown: every connection cut) and starts again while one training
    is deferred with its trigger following the job, and another sits right after sbatch on a worker."""
    deferred = stack.trigger("f_pg_deferred")
    wait(lambda: ti_state(stack, "f_pg_deferred", deferred) == ("deferred", 1), 240, "the training deferred", stack)
    submitting = armed(stack, "f_pg_submitting")
    paused_submitter(stack, "f_pg_submitting")
    # a component whose query the restart cut may exit (Airflow's triggerer does): its supervisor starts it
    stack.supervised, stack.revived = True, []
    try:
        started = time.monotonic()
        subprocess.run(["bash", str(REPO / "scripts" / "prod-stack.sh"), "restart-postgres"], check=True, timeout=120)
        down_for = time.monotonic() - started
        flag = flag_path(stack.pauses, "after-sbatch", "f_pg_submitting")
        flag.with_name(flag.name + ".release").touch()  # the worker saves the job id in the restarted database
        recovered = wait(
            lambda: stack.healthy() and time.monotonic() - started, 180, "every component healthy again", stack
        )
        for dag_id, run_id in (("f_pg_deferred", deferred), ("f_pg_submitting", submitting)):
            assert stack.wait_run(dag_id, run_id, 600) == "success", stack.explain(dag_id, run_id)
        stack.check_alive()
    finally:
        stack.supervised = False
    revived = sorted(set(stack.revived))
    for dag_id, run_id in (("f_pg_deferred", deferred), ("f_pg_submitting", submitting)):
        result = stack.xcom(dag_id, run_id, "train")
        jobs = jobs_named(dev_cluster, stack.specs[dag_id]["experiment"]["experiment"]["name"])
        assert jobs == result["job_ids"] and len(jobs) == 1, (dag_id, jobs, result["job_ids"])
        assert result["events"]["iteration"] == result["summary"]["iterations_run"] == 60, (dag_id, result)
        assert ti_state(stack, dag_id, run_id) == ("success", 1), dag_id  # no try was lost to the restart
    reliability.record(
        "PostgreSQL restarted mid-run",
        (
            f"{', '.join(revived)} exited on the lost connection and was started again"
            if revived
            else "every component rode it out"
        )
        + "; the deferred training and the one between sbatch and saving its job id "
        "each finished with one job, one try, every iteration counted once",
        duplicates=0,
        lost_events=0,
        recover_seconds=recovered,
        database_restart_seconds=round(down_for, 1),
    )
