"""Benchmark: hundreds of experiments' training tasks deferred at once on the production-shaped stack.

    .venv/bin/python benchmarks/scale_deferred.py [--jobs 50 200 500] [--interval 10] [--window 120]

Needs the dev cluster and the production services (scripts/dev-cluster.sh up, scripts/prod-stack.sh up).
Starts the e2e suite's production topology (PostgreSQL, Celery; two schedulers, triggerers and workers)
with one DAG per experiment, each a SlurmSubmitOperator whose job is submitted held (`#SBATCH --hold`):
pending for ever, no CPU on the cluster. Runs are triggered in steps up to each count; once every task
is deferred and its trigger runs, a window of `--window` seconds measures:
- triggerer CPU (both processes and their children) and CPU per poll cycle above the idle triggerer;
- slurmctld job-information RPCs per poll interval (`sdiag`), against the per-job pattern's one per job;
- SSH connections the triggerers hold to the cluster, against the per-job pattern's one per job;
- progress-XCom writes per minute (PostgreSQL's row counts of the xcom table);
- the scheduler loop time (Airflow's `scheduler.scheduler_loop_duration`, read from StatsD).
The first window, before any run, is the idle stack. Writes benchmarks/results/scale_deferred.json.
The DAG file is re-parsed every 300 s, not every 30 s as by default: 500 DAGs parsed every 30 s would
share the 2 cores with what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.cluster.test_poller import job_info_rpcs  # noqa: E402 - the repository root is put on the path first
from tests.cluster_fixtures import STATE_DIR, DevCluster, ssh_connection_uri  # noqa: E402
from tests.e2e.conftest import Stack, start_stack, wait  # noqa: E402
from tests.e2e.test_stack import FAKE, sweep  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CORE_BUDGET = 0.05  # the target: 500 jobs below 5 % of one core in the triggerer


class StatsdListener:
    """Airflow's StatsD metrics on a UDP port of 127.0.0.1: (arrival time, value) per timer name."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.timings: dict[str, list[tuple[float, float]]] = {}
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            data = self.socket.recv(65535).decode(errors="replace")
            now = time.monotonic()
            for line in data.splitlines():  # name:value|type[|@rate]
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                if kind.startswith("ms"):
                    self.timings.setdefault(name, []).append((now, float(value)))

    def between(self, name: str, start: float, end: float) -> list[float]:
        return [v for t, v in self.timings.get(name, []) if start <= t <= end]


def tree(stack: Stack, prefix: str) -> list[psutil.Process]:
    """The processes of every component whose name starts with `prefix`, with their children."""
    procs = []
    for name, popen in stack.procs.items():
        if name.startswith(prefix) and popen.poll() is None:
            root = psutil.Process(popen.pid)
            procs += [root, *root.children(recursive=True)]
    return procs


def cpu_seconds(stack: Stack, prefix: str) -> float:
    """CPU used so far by those processes, and by their children that ended and were waited for."""
    total = 0.0
    for p in tree(stack, prefix):
        with contextlib.suppress(psutil.NoSuchProcess):  # ended meanwhile: its parent counts it
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def ssh_connections(stack: Stack, prefix: str, port: int) -> int:
    count = 0
    for p in tree(stack, prefix):
        with contextlib.suppress(psutil.NoSuchProcess):
            count += sum(
                bool(c.raddr) and c.raddr.port == port and c.status == "ESTABLISHED" for c in p.net_connections()
            )
    return count


def xcom_writes(stack: Stack) -> int:
    rows = stack.sql("SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relname = 'xcom'")
    return int(rows[0][0]) if rows else 0


def measure(
    stack: Stack, cluster: DevCluster, statsd: StatsdListener, seconds: float, interval: float, jobs: int
) -> dict:
    ssh_port = int(cluster.env["SLURM_DEV_SSH_PORT"])
    components = ("triggerer", "scheduler", "worker", "dag-processor", "api-server")
    holders = dict(
        stack.sql("SELECT j.hostname, count(*) FROM trigger t JOIN job j ON j.id = t.triggerer_id GROUP BY j.hostname")
    )
    rpcs, writes, cpu = job_info_rpcs(cluster), xcom_writes(stack), {c: cpu_seconds(stack, c) for c in components}
    start = time.monotonic()
    time.sleep(seconds)  # the measured window
    end = time.monotonic()
    elapsed = end - start
    cpu = {c: cpu_seconds(stack, c) - cpu[c] for c in components}
    rpcs, writes = job_info_rpcs(cluster) - rpcs, xcom_writes(stack) - writes
    loops = statsd.between("airflow.scheduler.scheduler_loop_duration", start, end)
    intervals = elapsed / interval
    return {
        "jobs": jobs,
        "window_seconds": round(elapsed, 1),
        "poll_interval_seconds": interval,
        "triggers_per_triggerer": holders,
        "triggerer_cpu_percent_of_a_core": round(100 * cpu["triggerer"] / elapsed, 2),
        "cpu_percent_of_a_core": {c: round(100 * v / elapsed, 2) for c, v in cpu.items()},
        "job_info_rpcs_per_interval": round(rpcs / intervals, 2),
        "per_job_pattern_rpcs_per_interval": jobs,
        "triggerer_ssh_connections": ssh_connections(stack, "triggerer", ssh_port),
        "worker_ssh_connections": ssh_connections(stack, "worker", ssh_port),
        "progress_xcom_writes_per_minute": round(60 * writes / elapsed, 2),
        "scheduler_loops": len(loops),
        "scheduler_loop_ms_median": round(statistics.median(loops), 1) if loops else None,
        "scheduler_loop_ms_p95": round(sorted(loops)[int(0.95 * (len(loops) - 1))], 1) if loops else None,
    }


def count(stack: Stack, query: str) -> int:
    return int(stack.sql(query)[0][0])


def cancel_jobs(cluster: DevCluster, prefix: str) -> None:
    listed = cluster.ssh(["squeue", "--me", "--noheader", "--format=%i %j"], check=False).stdout.split("\n")
    ids = [line.split()[0] for line in listed if len(line.split()) == 2 and line.split()[1].startswith(prefix)]
    for start in range(0, len(ids), 500):
        cluster.ssh(["scancel", *ids[start : start + 500]], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[50, 200, 500], help="deferred tasks, ascending")
    parser.add_argument("--interval", type=int, default=10, help="monitoring.poll_interval_seconds of the jobs")
    parser.add_argument("--window", type=float, default=120, help="seconds measured at each count")
    parser.add_argument("--ramp-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=RESULTS / "scale_deferred.json")
    args = parser.parse_args()
    env_file = STATE_DIR / "cluster.env"
    cluster = DevCluster(dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line))
    token = uuid.uuid4().hex[:6]
    prefix = f"scale{token}_"
    remote = f"{cluster.env['SLURM_DEV_USER_HOME']}/oellm-bench/{token}"
    cluster.upload(f"{remote}/fake_megatron.py", FAKE.read_text(), mode="0644")
    work = Path(tempfile.mkdtemp(prefix="oellm-scale-"))
    experiments = sweep(
        work,
        remote,
        "scale",
        "train_iters: 100, save_interval: 50, iter_seconds: 1, seed: '${vars.i}'",
        "sweep: {axes: {i: [" + ",".join(map(str, range(max(args.jobs)))) + "]}, "
        f"name_template: '{prefix}{{i}}'}}\n"
        "slurm: {directives: {hold: true}}\n",  # pending for ever: the jobs use no CPU
        poll=args.interval,
    )
    dag_ids = [f"scale_{i:03d}" for i in range(len(experiments))]
    home = work / "airflow-home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "e2e" / "stack_dags.py", dags / "stack_dags.py")
    specs = [
        {"dag_id": d, "kind": "train", "conn_id": "slurm_dev", "experiment": e}
        for d, e in zip(dag_ids, experiments, strict=True)
    ]
    (dags / "scale.json").write_text(json.dumps({"dags": specs}))
    statsd = StatsdListener()
    env = {
        "AIRFLOW_CONN_SLURM_DEV": ssh_connection_uri(cluster),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
        "AIRFLOW__CORE__PARALLELISM": "8",
    }
    rows: list[dict] = []
    started = time.monotonic()
    stack = start_stack(home, dags, env, production=True)
    try:
        wait(lambda: count(stack, "SELECT count(*) FROM dag WHERE is_stale = false") >= len(dag_ids), 600, "DAGs")
        print(f"stack up, {len(dag_ids)} DAGs parsed after {time.monotonic() - started:.0f} s", flush=True)
        idle = measure(stack, cluster, statsd, min(args.window, 60), args.interval, 0)
        rows.append(idle)
        print(json.dumps(idle), flush=True)
        triggered = 0
        for jobs in args.jobs:
            ramp = time.monotonic()
            for dag_id in dag_ids[triggered:jobs]:
                stack.trigger(dag_id)
            triggered = jobs

            def all_deferred(jobs: int = jobs) -> bool:
                failed = count(stack, "SELECT count(*) FROM task_instance WHERE state IN ('failed', 'up_for_retry')")
                if failed:
                    raise SystemExit(f"{failed} task(s) failed; logs under {home / 'logs'}")
                return (
                    count(stack, "SELECT count(*) FROM task_instance WHERE state = 'deferred'") == jobs
                    and count(stack, "SELECT count(*) FROM trigger WHERE triggerer_id IS NOT NULL") == jobs
                    and count(stack, "SELECT count(*) FROM xcom WHERE key = 'progress'") == jobs
                )

            wait(all_deferred, args.ramp_timeout, f"{jobs} deferred tasks", stack, every=5)
            ramp_seconds = time.monotonic() - ramp
            time.sleep(2 * args.interval)  # the first cycles after the last deferral are not the steady state
            row = measure(stack, cluster, statsd, args.window, args.interval, jobs)
            row["ramp_seconds"] = round(ramp_seconds, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stack.stop()
        cancel_jobs(cluster, prefix)
        cluster.ssh(f"rm -rf {shlex.quote(remote)}", check=False)
    report(rows, args.interval)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    return 0


def report(rows: list[dict], interval: float) -> None:
    """The table, and the poll interval that keeps the triggerers' polling below the budget."""
    idle = rows[0]["triggerer_cpu_percent_of_a_core"]
    print(
        f"\n{'jobs':>5} {'trig CPU %':>10} {'CPU s/cycle':>11} {'RPCs/intv':>9} {'per-job':>7} {'SSH':>4} "
        f"{'XCom/min':>8} {'loop ms p50/p95':>15} {'ramp s':>6}"
    )
    for r in rows:
        cycles_per_second = max(len(r["triggers_per_triggerer"]), 1) / interval
        per_cycle = (r["triggerer_cpu_percent_of_a_core"] - idle) / 100 / cycles_per_second
        r["triggerer_cpu_seconds_per_cycle_above_idle"] = round(per_cycle, 4) if r["jobs"] else None
        loop = f"{r['scheduler_loop_ms_median']}/{r['scheduler_loop_ms_p95']}"
        print(
            f"{r['jobs']:>5} {r['triggerer_cpu_percent_of_a_core']:>10} "
            f"{(round(per_cycle, 4) if r['jobs'] else '-'):>11} {r['job_info_rpcs_per_interval']:>9} "
            f"{r['per_job_pattern_rpcs_per_interval']:>7} {r['triggerer_ssh_connections']:>4} "
            f"{r['progress_xcom_writes_per_minute']:>8} {loop:>15} {r.get('ramp_seconds', '-'):>6}"
        )
    biggest = rows[-1]
    if biggest["jobs"]:
        # each triggerer holding watches runs one cycle per interval: the interval at which their polling
        # (above the idle triggerer) is CORE_BUDGET of one core
        holders = max(len(biggest["triggers_per_triggerer"]), 1)
        least = biggest["triggerer_cpu_seconds_per_cycle_above_idle"] * holders / CORE_BUDGET
        print(
            f"\n{biggest['jobs']} jobs: polling stays below {CORE_BUDGET:.0%} of one core with "
            f"monitoring.poll_interval_seconds >= {least:.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
