"""A real Airflow stack for end-to-end tests, started from this venv with a fresh AIRFLOW_HOME and free ports,
stopped by process group. Two topologies:
- single: api-server, scheduler, dag-processor, triggerer; LocalExecutor on SQLite;
- production: PostgreSQL and the CeleryExecutor over Redis (scripts/prod-stack.sh), with two schedulers,
  two triggerers and two Celery workers (each process with its own hostname), a dag-processor and an
  api-server. Each stack has its own database and its own Celery queue."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
SINGLE = {name: (name,) for name in ("api-server", "scheduler", "dag-processor", "triggerer")}
PRODUCTION_SERVICES = Path(os.environ.get("OELLM_PROD_STATE_DIR", "/var/lib/oellm-prod-stack")) / "stack.env"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.cluster)


def sweeps_dag_file(dags: Path) -> None:
    """A stack's DAG folder: the project's DAG file, which loads the sweeps under $OELLM_SWEEPS_PATH."""
    shutil.copy(REPO / "dags" / "oellm_sweeps.py", dags / "oellm_sweeps.py")


def upload_fake_tools(dev_cluster: Any, remote: str) -> None:
    """The fake Megatron and the fake convert/evaluate tools, where the sweeps' jobs run them."""
    for tool in ("fake_megatron.py", "fake_tools.py"):
        dev_cluster.upload(f"{remote}/{tool}", (REPO / "tests" / "fixtures" / tool).read_text(), mode="0644")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(
    predicate: Callable[[], Any], timeout: float, what: str, stack: Stack | None = None, every: float = 1.0
) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # not ready yet: keep the last error for the message
            last = exc
        if stack is not None:
            stack.check_alive()
        time.sleep(every)  # poll
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last={last!r}")


def airflow_group(pgid: int) -> bool:
    """Whether an Airflow process (not a zombie) is left in this process group (a pid reused since is not)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X") and b"airflow" in (proc / "cmdline").read_bytes():
                return True
        except (OSError, IndexError, ValueError):  # gone, or not ours to read
            continue
    return False


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    base: str
    commands: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(SINGLE))  # process -> airflow args
    process_env: dict[str, dict[str, str]] = field(default_factory=dict)  # a process's own settings
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    restarting: set[str] = field(default_factory=set)
    access_token: str | None = None  # a JWT, when the stack does not make every caller an admin
    supervised: bool = False  # a component that exits is started again (`revived`), not a failure
    revived: list[str] = field(default_factory=list)
    groups: set[int] = field(default_factory=set)  # every component's process group, restarted ones' too

    def http(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.access_token:
            headers["Authorization"] = f"Bearer {self.access_token}"
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def start(self, component: str) -> None:
        log = self.logs.get(component) or open(self.home / f"{component}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs[component] = log
        self.procs[component] = subprocess.Popen(
            [AIRFLOW, *self.commands[component]],
            env={**self.env, **self.process_env.get(component, {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.groups.add(self.procs[component].pid)

    def kill(self, component: str) -> None:
        """kill -9 the component and its children (LocalExecutor workers, log servers)."""
        proc = self.procs[component]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def check_alive(self) -> None:
        for name, proc in list(self.procs.items()):
            if name in self.restarting or proc.poll() is None:
                continue
            if not self.supervised:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.home / (name + '.log')}")
            # as a supervisor with a restart policy would (the compose file's `restart: always`)
            self.revived.append(name)
            self.start(name)

    def stop(self) -> None:
        # every group, also one whose leader is gone: an api-server's worker outlives it, with a process title
        # that hides its environment (AIRFLOW_HOME) from the shared stacks' last sweep
        for pgid in self.groups:
            if airflow_group(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (left := [g for g in self.groups if airflow_group(g)]) and time.monotonic() < deadline:
            time.sleep(0.5)  # poll: the workers shut down
        for pgid in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for log in self.logs.values():
            log.close()
        drop_database(self.env)

    def healthy(self) -> bool:
        """Whether the api-server reports every component healthy."""
        h = self.http("GET", "/monitor/health")
        return all(h[k]["status"] == "healthy" for k in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def login(self, user: str = "admin", password: str | None = None) -> str:
        """A JWT for `user` of the simple auth manager (by default its generated password), kept for `http`."""
        if password is None:
            password = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())[user]
        request = urllib.request.Request(
            self.base.removesuffix("/api/v2") + "/auth/token",
            data=json.dumps({"username": user, "password": password}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            self.access_token = json.loads(response.read())["access_token"]
        return self.access_token

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self.http("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def cli(self, *args: str, timeout: float = 120) -> str:
        """The `airflow` command line against this stack's database. SQLite refuses a second writer
        outright when a transaction would deadlock ("database is locked"); the command rolled back
        and is run again, as it would not be on PostgreSQL."""
        for _ in range(10):
            done = subprocess.run(
                [AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
            )
            if "database is locked" not in done.stderr:
                break
            time.sleep(2)  # SQLite's lock is held by another writer: let it finish
        if done.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.http("GET", f"/dags/{dag_id}/dagRuns?limit=100&order_by=logical_date")["dag_runs"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.http("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        q = urllib.parse.quote(run_id, safe="")
        return self.http("GET", f"/dags/{dag_id}/dagRuns/{q}/taskInstances?limit=1000")["task_instances"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        return wait(
            lambda: (s := self.run_state(dag_id, run_id)) in ("success", "failed") and s,
            timeout,
            f"{dag_id} finished",
            self,
            every=2,
        )

    def explain(self, dag_id: str, run_id: str, tail: int = 40) -> str:
        """Every task's states, then the last lines of each failed attempt's log: what an assertion on a
        run's outcome prints, so a CI failure can be read without the machine."""
        lines, failed = [], []
        for ti in self.task_instances(dag_id, run_id):
            index = "" if ti["map_index"] < 0 else f"[{ti['map_index']}]"
            lines.append(f"{ti['task_id']}{index}: {ti['state']} (try {ti['try_number']})")
            if ti["state"] in ("failed", "up_for_retry"):
                failed.append(ti["task_id"])
        for task_id in failed:
            pattern = f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/*.log"
            for log in sorted((self.home / "logs").glob(pattern)):
                text = log.read_text(errors="replace").splitlines()[-tail:]
                lines += [f"--- {log.relative_to(self.home)}", *text]
        return "\n".join(lines)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        q = urllib.parse.quote(run_id, safe="")
        entry = self.http(
            "GET",
            f"/dags/{dag_id}/dagRuns/{q}/taskInstances/{task_id}/xcomEntries/{key}"
            f"?map_index={map_index}&deserialize=true",
        )
        return entry["value"]

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows from a production stack's metadata database (what no API tells: which triggerer holds a
        trigger, which scheduler queued a task)."""
        import psycopg2

        url = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg2", "")
        with contextlib.closing(psycopg2.connect(url)) as connection, connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall()

    def database_dump(self) -> bytes:
        """Every row of a production stack's database (pg_dump); a SQLite stack's is a file in its home."""
        url = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        if not url.startswith("postgresql"):
            return b""
        command = ["pg_dump", "--data-only", url.replace("+psycopg2", "")]
        return subprocess.run(command, capture_output=True, check=True).stdout

    def xcom_or_none(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """The XCom, or None while the task has not pushed it."""
        try:
            return self.xcom(dag_id, run_id, task_id, key)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def start_stack(home: Path, dags_folder: Path, extra_env: dict[str, str], production: bool = False) -> Stack:
    port = free_port()
    # SQLite: writers (CLI, scheduler, api-server) wait for each other's locks instead of failing
    (home / "oellm_e2e_db.py").write_text('CONNECT_ARGS = {"timeout": 60}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(home), env.get("PYTHONPATH", "")) if p)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags_folder),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS="oellm_e2e_db.CONNECT_ARGS",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API_AUTH__JWT_SECRET="oellm-e2e-" + "s" * 64,
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        AIRFLOW__TRIGGERER__CAPACITY="1000",
        # oellm_reconcile runs when a test triggers it: a scheduled run would race the test that looks at it
        AIRFLOW__OELLM__RECONCILE_INTERVAL_MINUTES="0",
        PYTHONWARNINGS="ignore",
    )
    commands, process_env = dict(SINGLE), {}
    if production:
        commands, process_env = production_topology(home, env)
    env.update(extra_env)
    stack = Stack(home, env, f"http://127.0.0.1:{port}/api/v2", commands, process_env)
    try:
        migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
        if migrate.returncode:
            raise RuntimeError(f"airflow db migrate failed:\n{migrate.stderr[-3000:]}")
        for component in commands:
            stack.start(component)

        wait(stack.healthy, 240, "all components healthy", stack)
    except BaseException:
        stack.stop()
        raise
    return stack


def production_services() -> dict[str, str]:
    """The PostgreSQL and Redis of scripts/prod-stack.sh."""
    if not PRODUCTION_SERVICES.exists():
        pytest.fail(f"production services not set up ({PRODUCTION_SERVICES} missing): run scripts/prod-stack.sh up")
    return dict(line.split("=", 1) for line in PRODUCTION_SERVICES.read_text().splitlines() if "=" in line)


def production_topology(
    home: Path, env: dict[str, str]
) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, str]]]:
    """Set `env` for PostgreSQL and Celery (a new database and queue for this stack); the processes, two
    of each but the dag-processor and the api-server, and each one's own hostname and log-server port."""
    import psycopg2

    services = production_services()
    token = uuid.uuid4().hex[:8]
    database = f"airflow_e2e_{token}"
    try:
        admin = psycopg2.connect(f"{services['OELLM_PROD_PG_URL'].replace('+psycopg2', '')}/postgres")
    except psycopg2.OperationalError as exc:
        pytest.fail(f"production services not running ({exc}): run scripts/prod-stack.sh up")
    admin.autocommit = True  # CREATE DATABASE runs outside a transaction
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    admin.close()
    (home / "oellm_e2e_host.py").write_text(
        "import os\n\n\ndef hostname() -> str:\n    return os.environ['OELLM_E2E_HOSTNAME']\n"
    )
    queue = f"oellm_e2e_{token}"
    del env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"]  # SQLite's lock timeout
    env.update(
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"{services['OELLM_PROD_PG_URL']}/{database}",
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CELERY__BROKER_URL=f"{services['OELLM_PROD_REDIS_URL']}/{1 + int(token, 16) % 63}",
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+{services['OELLM_PROD_PG_URL']}/{database}",
        AIRFLOW__CELERY__WORKER_CONCURRENCY="4",
        AIRFLOW__OPERATORS__DEFAULT_QUEUE=queue,
        AIRFLOW__CORE__HOSTNAME_CALLABLE="oellm_e2e_host.hostname",
        OELLM_E2E_HOSTNAME="cli",
    )
    commands: dict[str, tuple[str, ...]] = {"api-server": ("api-server",), "dag-processor": ("dag-processor",)}
    for n in (1, 2):
        commands[f"scheduler-{n}"] = ("scheduler",)
        commands[f"triggerer-{n}"] = ("triggerer",)
        commands[f"worker-{n}"] = ("celery", "worker", "--queues", queue, "--celery-hostname", f"worker-{n}-{token}@%h")
    process_env = {
        name: {
            "OELLM_E2E_HOSTNAME": name,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        for name in commands
    }
    return commands, process_env


def drop_database(env: dict[str, str]) -> None:
    """A production stack's database goes with it (its processes are stopped)."""
    url = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not url.startswith("postgresql"):
        return
    import psycopg2

    server, _, database = url.replace("+psycopg2", "").rpartition("/")
    try:
        admin = psycopg2.connect(f"{server}/postgres")
    except psycopg2.OperationalError:
        return  # the server is down: nothing to drop now
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory) -> Iterator[Callable[[Callable[[Path], None]], Stack]]:
    """Start one stack per module; the callback writes the DAG folder first (parsed before the start)."""
    started: list[Stack] = []

    def make(write_dags: Callable[[Path], None], env: dict[str, str] | None = None) -> Stack:
        home = tmp_path_factory.mktemp("airflow-e2e-home")
        dags = home / "dags"
        dags.mkdir()
        write_dags(dags)
        extra = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
        stack = start_stack(home, dags, {**extra, **(env or {})})
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.stop()
