"""The one-command demo (`make demo`, via scripts/demo.sh): a real Airflow runs the example sweep
(examples/demo/demo.yaml) on the dev SLURM cluster or, without root, as local processes; this script
starts Airflow, triggers the sweep, shows progress and ends with the report and the sweep's analysis.

Airflow keeps running afterwards for the UI; `make demo-stop` stops it.
    OELLM_DEMO_DIR    state (Airflow home, logs, local runs; default .demo/)
    OELLM_DEMO_PORT   the UI's port if free (default 8080; 0: any free port)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from airflow_oellm.config.naming import RUN_TASK, TRAIN_TASK, analysis_dir, experiment_name, sweep_dag_id
from airflow_oellm.slurm.identity import task_status_path

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("OELLM_DEMO_DIR") or REPO / ".demo")  # Airflow home, local runs, pids
HOME = DEMO / "airflow"
PIDS = DEMO / "pids"
VENV_BIN = Path(sys.executable).parent
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
CLUSTER_ENV = Path(os.environ.get("SLURM_DEV_STATE_DIR", "/var/lib/slurm-dev")) / "cluster.env"
SWEEP = "demo"
SWEEP_DAG = sweep_dag_id(SWEEP)


def say(text: str) -> None:
    print(text, flush=True)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the api-server binds: TIME_WAIT is free
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int = 0) -> int:
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop() -> None:
    """Stop the Airflow components a previous demo started (by the process groups it recorded)."""
    if not PIDS.exists():
        return
    groups = [int(p) for p in PIDS.read_text().split()]
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 30
    for pgid in groups:
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.3)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    PIDS.unlink()


def job_environment(batch_system: str, stamp: str) -> dict[str, str]:
    """Where the demo's jobs run, and what they run with."""
    if batch_system == "slurm":
        cluster = dict(
            line.split("=", 1) for line in CLUSTER_ENV.read_text().splitlines() if "=" in line
        )  # written by scripts/dev-cluster.sh up
        host_key = next(
            f"{parts[1]} {parts[2]}"
            for parts in (line.split() for line in Path(cluster["SLURM_DEV_SSH_KNOWN_HOSTS"]).read_text().splitlines())
            if len(parts) >= 3 and parts[1] == "ssh-ed25519"
        )
        connection = {
            "conn_type": "ssh",
            "host": cluster["SLURM_DEV_SSH_HOST"],
            "port": int(cluster["SLURM_DEV_SSH_PORT"]),
            "login": cluster["SLURM_DEV_SSH_USER"],
            "extra": {"key_file": cluster["SLURM_DEV_SSH_KEY"], "host_key": host_key},  # pinned: verified
        }
        tools = Path(os.environ.get("SLURM_DEV_TOOLS_DIR", "/opt/oellm-dev-tools"))
        return {
            "AIRFLOW_CONN_SLURM_DEV": json.dumps(connection),
            "OELLM_DEMO_PLATFORM": "devcluster",
            "OELLM_DEMO_OUTPUT_DIR": f"{cluster['SLURM_DEV_USER_HOME']}/oellm-demo/{stamp}",
            "OELLM_DEMO_TOOLS_BIN": str(tools / "bin"),
            "OELLM_TINY_MEGATRON": str(tools / "tiny_megatron"),
        }
    return {
        "OELLM_DEMO_PLATFORM": "local-process",
        "OELLM_DEMO_OUTPUT_DIR": str(DEMO / "runs" / stamp),
        "OELLM_DEMO_TOOLS_BIN": str(VENV_BIN),
        "OELLM_TINY_MEGATRON": str(REPO / "examples" / "tiny_megatron"),
        "OELLM_LOCAL_JOBS_DIR": str(DEMO / "local-jobs"),
    }


class Airflow:
    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.token = ""

    def http(self, method: str, path: str, body: Any = None) -> Any:
        """One request; a read is asked again when the answer timed out (SQLite busy on a loaded machine)."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        for attempt in itertools.count(1):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read() or b"{}")
            except TimeoutError:
                if method != "GET" or attempt == 3:
                    raise

    def trigger(self, dag_id: str) -> str:
        """A new run of `dag_id`. Its id is chosen here: a request asked again after a timed-out answer finds
        the run the first one made (409) instead of making a second."""
        run_id = f"manual__demo_{time.strftime('%Y%m%dT%H%M%S')}"
        body = {"logical_date": None, "dag_run_id": run_id, "conf": {}}
        for attempt in itertools.count(1):
            try:
                return self.api("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]
            except urllib.error.HTTPError as exc:
                if exc.code == 409:  # made by a request whose answer timed out
                    return run_id
                raise
            except TimeoutError:
                if attempt == 3:
                    raise

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return self.http(method, f"/api/v2{path}", body)

    def start(self) -> None:
        subprocess.run(
            [str(VENV_BIN / "airflow"), "db", "migrate"], env=self.env, check=True, capture_output=True, timeout=600
        )
        groups = []
        for component in COMPONENTS:
            log = open(HOME / f"{component}.log", "ab")  # noqa: SIM115 - the child keeps it
            proc = subprocess.Popen(
                [str(VENV_BIN / "airflow"), component],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # keeps running after this script; `make demo-stop` ends it
            )
            groups.append(str(proc.pid))
        PIDS.write_text("\n".join(groups) + "\n")

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = self.api("GET", "/monitor/health")
                if all(health[k]["status"] == "healthy" for k in ("metadatabase", "scheduler", "triggerer")):
                    return
            except (OSError, KeyError, urllib.error.URLError):
                pass
            time.sleep(2)
        raise SystemExit(f"Airflow did not become healthy in {timeout:.0f} s; see the logs in {HOME}")

    def login(self, user: str, password: str) -> None:
        self.token = self.http("POST", "/auth/token", {"username": user, "password": password})["access_token"]


def wait_for_dag(airflow: Airflow, dag_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            airflow.api("GET", f"/dags/{dag_id}")
            return
        except urllib.error.HTTPError:
            time.sleep(2)
    errors = airflow.api("GET", "/importErrors")
    raise SystemExit(f"DAG {dag_id} did not appear in {timeout:.0f} s; import errors: {errors}")


def quote(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


def experiment_runs(airflow: Airflow, sweep_run: str) -> dict[str, tuple[str, str]]:
    """{experiment DAG id: (run id, state)} of the runs the sweep DAG started."""
    found = {}
    tis = airflow.api("GET", f"/dags/{SWEEP_DAG}/dagRuns/{quote(sweep_run)}/taskInstances?limit=100")
    for ti in tis["task_instances"]:
        if ti["task_id"] != RUN_TASK or ti.get("map_index", -1) < 0:
            continue
        dag_id = ti.get("rendered_map_index") or ""
        if not dag_id:
            continue
        runs = airflow.api("GET", f"/dags/{dag_id}/dagRuns?limit=1")["dag_runs"]  # a fresh Airflow: only this run
        if runs:
            found[dag_id] = (runs[0]["dag_run_id"], runs[0]["state"])
    return found


def current_iteration(output_dir: Path) -> int | None:
    """The training's checkpoint when its last attempt ended, from the status file the provider keeps
    beside the run (none while its first attempt runs)."""
    try:
        return json.loads(Path(task_status_path(str(output_dir), TRAIN_TASK)).read_text()).get("iteration")
    except (OSError, ValueError):
        return None


def progress_line(airflow: Airflow, sweep_run: str, outputs: Path, started: float) -> str:
    runs = experiment_runs(airflow, sweep_run)
    states = [state for _, state in runs.values()]
    parts = []
    for dag_id, (run_id, _) in sorted(runs.items()):
        name = experiment_name(dag_id, SWEEP)
        tis = airflow.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances?limit=1000")["task_instances"]
        active = sum(1 for t in tis if t["state"] in ("running", "deferred", "queued", "scheduled"))
        done = sum(1 for t in tis if t["state"] in ("success", "skipped"))
        iteration = current_iteration(outputs / name)
        parts.append(f"{name} it {iteration if iteration is not None else '-'} ({done} tasks done, {active} active)")
    elapsed = time.monotonic() - started
    summary = (
        f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] experiments: {states.count('success')} done, "
        f"{states.count('running') + states.count('queued')} running, {states.count('failed')} failed"
    )
    return summary + ("\n    " + "\n    ".join(parts) if parts else "")


def check_report(name: str, report: dict[str, Any]) -> list[str]:
    """What the demo promises: losses fall across the parent's checkpoints, cooldowns end below it."""
    rows = report["rows"]
    parent = sorted((r for r in rows if r["run"] == name), key=lambda r: r["iteration"])
    problems = []
    losses = [r.get("train_loss") for r in parent]
    if len(losses) < 2 or any(a is None or b is None or a <= b for a, b in itertools.pairwise(losses)):
        problems.append(f"{name}: training losses do not fall across checkpoints: {losses}")
    by_iteration = {r["iteration"]: r for r in parent}
    for row in rows:
        if row["run"] == name or row["iteration"] not in by_iteration:
            continue
        mine, theirs = row.get("validation_loss"), by_iteration[row["iteration"]].get("validation_loss")
        if mine is None or theirs is None or mine >= theirs:
            run, at = row["run"], row["iteration"]
            problems.append(f"{run} at {at}: validation loss {mine} not below the parent's {theirs}")
    return problems


def check_analysis(analysis: dict[str, Any], reports: list[dict[str, Any]]) -> list[str]:
    """The analysis agrees with the reports it was made from: each size's best learning rate is the one whose
    cooldown ended lowest, and with two sizes there is no law, and it says why."""
    ended: dict[float, dict[float, float]] = {}
    for report in reports:
        for row in report["rows"]:
            if row.get("comparable") == "cooldown" and row.get("validation_loss") is not None:
                ended.setdefault(row["parameters"], {})[report["settings"]["lr"]] = row["validation_loss"]
    problems = []
    best = analysis.get("best", {}).get("lr", {})
    for size, losses in sorted(ended.items()):
        want, got = min(losses, key=losses.__getitem__), best.get(f"{size:.4g}", {}).get("value")
        if got != want:
            problems.append(f"analysis: best lr of N={size:.4g} is {got}, the cooldowns show {want} ({losses})")
    if len(ended) != 2:
        problems.append(f"analysis: {len(ended)} model sizes have cooldown losses, the demo has 2")
    if "3 model sizes" not in analysis.get("loss_law", {}).get("why_not", ""):
        problems.append(f"analysis: the law over 2 sizes is not refused: {analysis.get('loss_law')}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-system", choices=["slurm", "local-process"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the sweep")
    parser.add_argument("--stop", action="store_true", help="only stop a running demo")
    args = parser.parse_args()
    stop()
    if args.stop:
        say("demo stopped")
        return 0
    if not args.batch_system:
        parser.error("--batch-system is required (scripts/demo.sh chooses it)")
    started = float(os.environ.get("OELLM_DEMO_STARTED", time.time()))
    clock = time.monotonic() - (time.time() - started)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    shutil.rmtree(HOME, ignore_errors=True)
    (HOME / "dags").mkdir(parents=True)
    # the project's loader, for the demo sweep only (config/sweeps has more examples)
    (HOME / "dags" / "oellm_demo.py").write_text(
        "from airflow_oellm.dag_factory import load_dags\n\n"
        f"globals().update(load_dags([{str(REPO / 'examples' / 'demo')!r}]))\n"
    )
    (HOME / "sqlite_timeout.py").write_text('CONNECT_ARGS = {"timeout": 60}\n')  # writers wait, not fail
    password = secrets.token_urlsafe(12)
    (HOME / "passwords.json").write_text(json.dumps({"admin": password}))
    port = free_port(int(os.environ.get("OELLM_DEMO_PORT", "8080")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(job_environment(args.batch_system, stamp))
    env.update(
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        PYTHONPATH=str(HOME),
        AIRFLOW_HOME=str(HOME),
        AIRFLOW__CORE__DAGS_FOLDER=str(HOME / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="8",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(HOME / "passwords.json"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS="sqlite_timeout.CONNECT_ARGS",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(40),
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="30",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        PYTHONWARNINGS="ignore",
    )
    outputs_root = Path(env["OELLM_DEMO_OUTPUT_DIR"])
    where = "the dev SLURM cluster" if args.batch_system == "slurm" else "local processes (no SLURM)"
    say(f"== starting Airflow (LocalExecutor, SQLite) on {env['AIRFLOW__API__BASE_URL']}; jobs run on {where}")
    airflow = Airflow(env, port)
    airflow.start()
    airflow.wait_healthy()
    airflow.login("admin", password)
    wait_for_dag(airflow, SWEEP_DAG)
    sweep_run = airflow.trigger(SWEEP_DAG)
    say(
        f"== triggered {SWEEP_DAG} ({sweep_run}): 4 experiments, a cooldown each, conversion + evaluation of "
        f"every checkpoint; outputs in {outputs_root}"
    )
    deadline = time.monotonic() + args.timeout
    last = ""
    state = "running"
    while time.monotonic() < deadline:
        state = airflow.api("GET", f"/dags/{SWEEP_DAG}/dagRuns/{quote(sweep_run)}")["state"]
        try:
            line = progress_line(airflow, sweep_run, outputs_root, clock)
        except urllib.error.HTTPError as exc:  # the sweep's tasks are not scheduled yet
            line = "[--:--] waiting for the scheduler" if exc.code == 404 else f"(progress unavailable: {exc})"
        except (KeyError, urllib.error.URLError) as exc:
            line = f"(progress unavailable: {exc})"
        if line.split("]", 1)[-1] != last.split("]", 1)[-1]:
            say(line)
            last = line
        if state in ("success", "failed"):
            break
        time.sleep(5)
    else:
        say(f"the sweep did not finish in {args.timeout:.0f} s")

    problems, reports = [], []
    say("\n== report (per experiment: training and cooldown runs at each checkpoint)")
    for directory in sorted(p for p in outputs_root.iterdir() if (p / "report" / "report.json").exists()):
        report = json.loads((directory / "report" / "report.json").read_text())
        say(f"\n### {directory.name}\n")
        say((directory / "report" / "report.md").read_text())
        say(f"plot: {directory / 'report' / 'loss.png'}")
        problems += check_report(directory.name, report)
        reports.append(report)
    analysis = Path(analysis_dir(str(outputs_root), SWEEP))
    say(f"\n== analysis (the sweep DAG's analysis task; offline: airflow-oellm analyze {outputs_root})\n")
    if (analysis / "analysis.json").exists():
        say((analysis / "analysis.md").read_text())
        say(f"plots: {analysis}/*.png, *.svg")
        problems += check_analysis(json.loads((analysis / "analysis.json").read_text()), reports)
    else:
        problems.append(f"analysis: no {analysis}/analysis.json")
    elapsed = time.monotonic() - clock
    say(f"\n== sweep {state} in {int(elapsed // 60)} min {int(elapsed % 60)} s (from the start of `make demo`)")
    for problem in problems:
        say(f"CHECK FAILED: {problem}")
    if not problems and state == "success":
        say(
            "checks: losses fall across checkpoints in every experiment; every cooldown ends below its parent; "
            "the analysis's best learning rate per size is the cooldowns' best"
        )
    say(f"\nAirflow UI: {env['AIRFLOW__API__BASE_URL']}  (user admin, password {password})")
    say(f"sweep dashboard: {env['AIRFLOW__API__BASE_URL']}/oellm/sweeps/{SWEEP}")
    say(f"logs: {HOME}/*.log   stop it with: make demo-stop")
    return 0 if state == "success" and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
