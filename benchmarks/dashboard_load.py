"""Benchmark: the dashboard's sweep page for sweeps of 100 and 1,000 experiments in the middle of training,
against the Airflow REST API calls a script needs to read the same facts.

    .venv/bin/python benchmarks/dashboard_load.py [--experiments 100 1000] [--repeat 15] [--baseline-repeat 3]
        [--json OUT]

A fresh Airflow home (SQLite) gets one sweep per size (`bench<N>`), its DAGs serialized and one run per
experiment written through Airflow's own models, as the operators leave them mid-training (XComs stored as
Airflow 3's tasks store them: a JSON document): `prepare` done (config, milestones), the training deferred in
its second try with a 250-point progress XCom and a first attempt in its history, half the checkpoints waited
for, converted and evaluated (metrics in XCom), a cooldown finished. The SQL statements of the sweeps page and
of each sweep's page (its first load and a later one) are counted here, through the functions the api-server
calls. Then only the api-server is started, and for each sweep timed:
- its first load: the first request for that sweep since the server started (each run's live report is made
  then, and kept while its XComs stay the same);
- ours: `GET /oellm/sweeps/<sweep>` (the whole HTML page: the first 50 rows, their curves, the distributions
  over every experiment, the analysis), its JSON twin, and its page 2 sorted by loss, highest first;
- baseline: per experiment, the REST calls for its latest run, its task instances, the training's progress
  XCom and the prepared config (4 calls per experiment, sequential, one keep-alive client).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from airflow_oellm.config import naming

REPO = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_yaml(experiments: int, name: str) -> str:
    return f"""
defaults: [{{platform: devcluster}}]
project: {{name: bench, base_output_dir: /scratch/bench/runs}}
backend: {{args: {{train_iters: 10000, save_interval: 1000, eval_interval: 1000, seq_length: 4096,
  global_batch_size: 512}}}}
slurm: {{nodes: 4}}
evaluation: {{suites: [{{name: quick, tasks: [hellaswag, arc_easy]}}]}}
cooldowns: [{{at: 5000, overrides: [backend.args.train_iters=6000]}}]
sweep: {{name: {name}, name_template: "e{{seed}}", axes: {{backend.args.seed: {list(range(experiments))}}}}}
"""


def curve(first: int, last: int, points: int = 250) -> list[list[float]]:
    step = max((last - first) / (points - 1), 1)
    return [[round(first + i * step), 10 * math.exp(-(first + i * step) / 3000) + 2] for i in range(points)]


def populate(sweep_file: Path) -> None:
    """One mid-training run per experiment, written with Airflow's models (in the home `run` set)."""
    from airflow_oellm.config import load_sweep

    sweep = load_sweep(sweep_file)
    now = datetime.now(UTC)
    for exp in sweep.experiments:
        mid_training_run(exp, now)


def mid_training_run(exp, now: datetime) -> None:
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.task_state_store import TaskStateStoreModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.sdk.serde import serialize
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    from airflow_oellm.config.milestones import plan

    with create_session() as session:
        dag = SerializedDagModel.get_dag(exp.dag_id, session=session)
        run = dag.create_dagrun(
            run_id="manual__bench",
            run_after=now - timedelta(hours=6),
            run_type=DagRunType.MANUAL,
            triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.RUNNING,
            start_date=now - timedelta(hours=6),
            session=session,
        )
        session.flush()
        milestones = plan(exp.resolved)
        evaluations = [dict(e) for e in milestones.evaluations]
        cooldowns = [dict(c) for c in milestones.cooldowns]
        tis = {(ti.task_id, ti.map_index): ti for ti in run.get_task_instances(session=session)}
        for key, ti in tis.items():
            ti.state = "success" if key[0] in ("prepare", "cooldown_plan") else None
        tis[("train", -1)].state, tis[("train", -1)].try_number = "deferred", 2
        done = len(evaluations) // 2

        def mapped(task_id: str, index: int, state: str | None) -> None:
            ti = tis.get((task_id, index))
            if ti is None:
                if (task_id, -1) in tis:
                    ti = tis.pop((task_id, -1))
                    ti.map_index = index
                else:
                    ti = TaskInstance(
                        task=dag.get_task(task_id),
                        run_id=run.run_id,
                        map_index=index,
                        dag_version_id=run.created_dag_version_id,
                    )
                    session.add(ti)
                tis[(task_id, index)] = ti
            ti.state = state
            ti.end_date = now - timedelta(minutes=30) if state == "success" else None

        for index in range(len(evaluations)):
            finished = index < done
            mapped("checkpoint.wait", index, "success" if finished else "deferred")
            mapped("checkpoint.convert", index, "success" if finished else None)
            mapped("checkpoint.evaluate", index, "success" if finished else None)
        for index in range(len(cooldowns)):
            for task_id in ("cooldown.wait", "cooldown.train"):
                mapped(task_id, index, "success")
        session.flush()

        def xcom(task_id: str, key: str, value: object, map_index: int = -1) -> None:
            # as a task's xcom_push stores it: the Task SDK's serde, then the execution API's set, unserialized
            XComModel.set(
                key,
                serialize(value),
                dag_id=exp.dag_id,
                task_id=task_id,
                run_id=run.run_id,
                map_index=map_index,
                serialize=False,
                session=session,
            )

        xcom(naming.PREPARE_TASK, naming.CONFIG_KEY, exp.resolved)
        xcom(naming.PREPARE_TASK, naming.COOLDOWNS_KEY, cooldowns)
        xcom(naming.PREPARE_TASK, naming.RETURN_KEY, evaluations)
        summary = {
            "last_iteration": 6200,
            "train_iters": 10000,
            "last_loss": 3.1,
            "iteration_ms": 1500.0,
            "running_since": time.time() - 3 * 3600,
            "loss_curve": curve(4001, 6200),
            "validation": [{"iteration": i, "loss": 3.2, "split": "validation"} for i in range(5000, 6001, 1000)],
            "checkpoints_saved": [5000, 6000],
            "counts": {"iteration": 2200},
        }
        xcom(
            naming.TRAIN_TASK,
            naming.PROGRESS_KEY,
            {"job_id": "1002", "job_state": "RUNNING", "updated": time.time(), "summary": summary},
        )
        for index in range(done):
            metrics = {"quick": {"hellaswag": 0.3 + index / 100, "arc_easy": 0.4 + index / 100}}
            xcom(naming.CHECKPOINT_EVALUATE_TASK, naming.RETURN_KEY, {"metrics": metrics}, index)
        for index in range(len(cooldowns)):
            xcom(
                naming.COOLDOWN_TRAIN_TASK,
                naming.RETURN_KEY,
                {
                    "final_state": "COMPLETED",
                    "last_iteration": 6000,
                    "summary": {"loss_curve": curve(5001, 6000), "last_iteration": 6000},
                    "attempts": [{"try": 1, "job_id": "2001", "gpu_hours": 12.0}],
                },
                index,
            )
        first_try = {
            "try": 1,
            "job_id": "1001",
            "submitted_at": time.time() - 6 * 3600,
            "end": None,
            "state": "TIMEOUT",
            "verdict": "retry",
            "reason": "time limit",
            "gpu_hours": 64.0,
            "loss_curve": curve(1, 4000),
            "checkpoints_saved": [1000, 2000, 3000, 4000],
            "last_iteration": 4000,
        }
        history = {"attempts": [first_try, {"try": 2, "job_id": "1002", "submitted_at": time.time() - 3 * 3600}]}
        session.add(
            TaskStateStoreModel(
                dag_run_id=run.id,
                task_id=naming.TRAIN_TASK,
                map_index=-1,
                key=naming.HISTORY_KEY,
                dag_id=exp.dag_id,
                run_id=run.run_id,
                value=json.dumps(history),
            )
        )


def timed(call, repeat: int, warm: bool = True) -> dict[str, float]:
    if warm:
        call()  # the first request of a kind opens what it reads
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(samples), 4), "max_s": round(max(samples), 4)}


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as response:
        return response.read()


def statements(call) -> int:
    """How many SQL statements `call` runs on Airflow's database."""
    from airflow import settings
    from sqlalchemy import event

    count = 0

    def counted(*_: object) -> None:
        nonlocal count
        count += 1

    event.listen(settings.engine, "before_cursor_execute", counted)
    try:
        call()
    finally:
        event.remove(settings.engine, "before_cursor_execute", counted)
    return count


def airflow_home(sizes: list[int]) -> tuple[Path, dict[str, str], int]:
    """A fresh Airflow home with one sweep file per size, its database migrated and its DAGs serialized."""
    home = Path(tempfile.mkdtemp(prefix="oellm-dashboard-bench-"))
    (home / "dags").mkdir()
    shutil.copy(REPO / "dags" / "oellm_sweeps.py", home / "dags" / "oellm_sweeps.py")
    sweeps = home / "sweeps"
    sweeps.mkdir()
    for size in sizes:
        (sweeps / f"bench{size}.yaml").write_text(sweep_yaml(size, f"bench{size}"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        OELLM_SWEEPS_PATH=str(sweeps),
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__API_AUTH__JWT_SECRET="oellm-bench-" + "s" * 64,
        PYTHONWARNINGS="ignore",
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run([AIRFLOW, "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=1800)
    return home, env, port


def run(sizes: list[int], repeat: int, baseline_repeat: int, out: Path, keep: bool = False) -> dict:
    """Each size's figures (`baseline_repeat` 0: no baseline), written to `out` as each size is measured. Imports
    Airflow for a home of its own: run it in a process that has not imported Airflow yet (the script's own)."""
    home, env, port = airflow_home(sizes)
    result: dict = {"sweeps": {}}
    try:
        os.environ.update(env)  # before Airflow is imported: it reads its home once
        from airflow_oellm.dashboard.app import sweep_data, sweeps_overview
        from airflow_oellm.dashboard.model import PER_PAGE, SweepRequest

        for size in sizes:
            started = time.monotonic()
            populate(home / "sweeps" / f"bench{size}.yaml")
            result["sweeps"][size] = {
                "experiments": size,
                "populate_seconds": round(time.monotonic() - started, 1),
                # with every sweep populated so far: the count must not grow with them
                "statements_sweeps_page": statements(partial(sweeps_overview, None)),
            }
        for size, figures in result["sweeps"].items():
            first_page = partial(sweep_data, None, f"bench{size}", SweepRequest())
            figures["statements_sweep_page_first_load"] = statements(first_page)
            figures["statements_sweep_page"] = statements(first_page)
        server = subprocess.Popen(
            [AIRFLOW, "api-server", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base)
            get(f"{base}/oellm/")  # the dashboard's app imported
            for size, figures in result["sweeps"].items():
                print(f"measuring bench{size}", file=sys.stderr, flush=True)
                figures.update(measure(base, f"bench{size}", size, repeat, baseline_repeat))
                if baseline_repeat:
                    baseline_s = figures["baseline_rest_4_calls_per_experiment"]["median_s"]
                    figures["ratio_baseline_over_page"] = round(baseline_s / figures["dashboard_page"]["median_s"], 1)
                out.write_text(json.dumps(result, indent=2) + "\n")
                assert figures["rows"] == min(size, PER_PAGE), figures
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    finally:
        if keep:
            print("Airflow home kept:", home)
        else:
            shutil.rmtree(home, ignore_errors=True)
    return result


def wait_healthy(base: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            get(f"{base}/api/v2/monitor/health")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)  # the api-server is starting


def measure(base: str, name: str, size: int, repeat: int, baseline_repeat: int) -> dict:
    url = f"{base}/oellm/sweeps/{name}"
    started = time.perf_counter()
    page = get(url)
    first_load = time.perf_counter() - started
    figures = {
        "first_load_s": round(first_load, 4),
        "rows": page.decode().count("<tr data-experiment="),
        "page_bytes": len(page),
        "json_bytes": len(get(f"{base}/oellm/api/sweeps/{name}")),
        "dashboard_page": timed(lambda: get(url), repeat),
        "dashboard_json": timed(lambda: get(f"{base}/oellm/api/sweeps/{name}"), repeat),
        "page_2_by_loss_descending": timed(lambda: get(f"{url}?sort=-loss&page=2"), repeat),
    }
    if baseline_repeat:
        dag_ids = [naming.dag_id(name, f"e{i}") for i in range(size)]

        def baseline() -> None:
            for dag_id in dag_ids:
                runs = json.loads(get(f"{base}/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after&limit=1"))
                run_id = urllib.request.quote(runs["dag_runs"][0]["dag_run_id"], safe="")
                get(f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")
                for task_id, key in (
                    (naming.TRAIN_TASK, naming.PROGRESS_KEY),
                    (naming.PREPARE_TASK, naming.CONFIG_KEY),
                ):
                    get(f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")

        # no warm-up round: a round at 1,000 experiments takes minutes, and the server is warm from the pages
        figures["baseline_rest_4_calls_per_experiment"] = timed(baseline, baseline_repeat, warm=False)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--baseline-repeat", type=int, default=3, help="0: no baseline")
    parser.add_argument("--json", type=Path, default=RESULTS / "dashboard_load.json")
    parser.add_argument("--keep", action="store_true", help="keep the Airflow home (its path is printed)")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = run(args.experiments, args.repeat, args.baseline_repeat, args.json, args.keep)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
