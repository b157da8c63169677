"""Airflow stacks shared by several test modules, so that a scenario joins a stack instead of booting one.

- `airflow`: the stack of the modules that never kill a component, in the production topology (PostgreSQL,
  Celery, two schedulers, triggerers and workers). Its DAG folder holds the project's DAG
  file; a module adds its sweep files to `stack.sweeps` (OELLM_SWEEPS_PATH). Logins are real (no
  all-admins); the stack is logged in as admin. xdist workers share it: the first module to need it boots
  it, the others attach to it through a state file.
- `faults`: the fault-injection module's stack, in the production topology too: it kills one of two
  schedulers, triggerers and workers, and restarts PostgreSQL. Its DAG folder holds tests/e2e/stack_dags.py;
  a module adds its DAG specs as a JSON file there (`stack.dags`). Pauses after sbatch and before judging
  (`stack.pauses`) and a secret variable (`stack.secret`, as `oellm_token`) are configured.
- `sqlite`: the same for tests/e2e/test_stack.py on one machine's Airflow (SQLite, LocalExecutor): its
  scenarios (a triggerer restart, the settle race) are measured there, where they were found.

The modules of `faults` and `sqlite` kill components and restart them, which only the worker that booted the
stack can do: in each CI pass (tests/parallel.py) a controlled stack's tests are one unit of one worker.
`faults` runs twice: in the shared pass for the scenarios that kill only its own components, in the serial
lane for those that take the cluster or PostgreSQL away. `sqlite` runs in the serial lane, after it: the
two never run at once.

A module asks for its group's stack with the `shared_stack` fixture (module-scoped), and gets its own copy
of the `Stack` (for its attributes). The stack stops when no module uses it and the next test on this
worker is not one of its modules; the controller (or the only process, without xdist) stops whatever is
left at the end, Ctrl-C included: every process running with a stack's AIRFLOW_HOME.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

MODULES = {
    "airflow": (
        "tests/e2e/test_alerts_stack.py",
        "tests/e2e/test_dashboard_stack.py",
        "tests/e2e/test_factory_stack.py",
        "tests/e2e/test_sweep_analysis_stack.py",
    ),
    "faults": ("tests/faults/test_airflow_faults.py",),
    "sqlite": ("tests/e2e/test_stack.py",),
}
# kills and restarts components, which only the process that started them can do (one worker per pass)
CONTROLLED = {"faults", "sqlite"}
# on PostgreSQL and the CeleryExecutor, two schedulers, triggerers and workers (tests/e2e/conftest.py)
PRODUCTION = {"airflow", "faults"}
SECRET_SETTINGS = ("AIRFLOW_VAR_", "AIRFLOW_CONN_OELLM_E2E_SECRET")  # kept out of the state file
STATE_DIR_VARIABLE = "OELLM_SHARED_STACKS"
LOCAL: dict[str, Any] = {}  # the stacks this process booted: their processes are its children
JOINED: set[str] = set()


def group_of(nodeid: str) -> str | None:
    module = nodeid.split("::", 1)[0]
    return next((name for name, modules in MODULES.items() if module in modules), None)


def pytest_configure(config: pytest.Config) -> None:
    if STATE_DIR_VARIABLE not in os.environ:  # the controller (xdist workers inherit its environment)
        os.environ[STATE_DIR_VARIABLE] = tempfile.mkdtemp(prefix="oellm-shared-stacks-")
        config.stash[owner_key] = True


owner_key = pytest.StashKey[bool]()


def pytest_unconfigure(config: pytest.Config) -> None:
    if not config.stash.get(owner_key, False):
        return
    state_dir = Path(os.environ.pop(STATE_DIR_VARIABLE))
    try:
        for name in MODULES:
            with contextlib.suppress(Exception), locked(state_dir, name):  # stop the others all the same
                stop(state_dir, name)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def locked(state_dir: Path, name: str) -> Iterator[None]:
    with open(state_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_state(state_dir: Path, name: str) -> dict[str, Any] | None:
    path = state_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_state(state_dir: Path, name: str, state: dict[str, Any]) -> None:
    (state_dir / f"{name}.json").write_text(json.dumps(state))


def stop(state_dir: Path, name: str) -> None:
    """Stop the stack `name` (the state lock held): through its processes if this process booted it, then
    every process group still running with its AIRFLOW_HOME (components restarted by a test, task runners,
    a stack booted by a worker that crashed)."""
    from tests.e2e.conftest import drop_database

    state = read_state(state_dir, name)
    local = LOCAL.pop(name, None)
    JOINED.discard(name)
    if state is None:
        return
    (state_dir / f"{name}.json").unlink()
    if local is not None and str(local.home) == state["home"]:
        local.stop()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = processes_of(state["home"])
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + 30
        while groups and time.monotonic() < deadline and processes_of(state["home"]):
            time.sleep(0.5)  # poll: the components shut down
    drop_database(state["env"])


def processes_of(home: str) -> set[int]:
    """The process groups of the running (not zombie) processes whose AIRFLOW_HOME is `home`."""
    needle = f"\0AIRFLOW_HOME={home}\0".encode()
    groups = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle not in b"\0" + (proc / "environ").read_bytes() + b"\0":
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone, or not ours to read
            continue
        if fields[0] not in ("Z", "X"):
            groups.add(int(fields[2]))
    return groups


def boot_airflow(home: Path) -> tuple[Callable[[Path], None], dict[str, str], dict[str, Any]]:
    from tests.e2e.conftest import sweeps_dag_file

    sweeps = home / "sweeps"
    sweeps.mkdir()
    token, password = stack_secrets(home)
    env = {
        "OELLM_SWEEPS_PATH": str(sweeps),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__PARALLELISM": "8",  # two modules' runs at once
        # what a sweep's platform.secrets names: from the environment, so that no database row holds them
        "AIRFLOW_VAR_OELLM_E2E_TOKEN": token,
        "AIRFLOW_CONN_OELLM_E2E_SECRET": json.dumps({"conn_type": "generic", "login": "u", "password": password}),
    }
    return sweeps_dag_file, env, {"sweeps": sweeps}


def stack_secrets(home: Path) -> tuple[str, str]:
    """The `airflow` stack's Variable `oellm_e2e_token` and Connection `oellm_e2e_secret`'s password, made from
    its home (every module of the group finds them; no state file holds them), hostile to a shell."""
    digest = hashlib.sha256(f"oellm-e2e-secret:{home}".encode()).hexdigest()
    return f"tok-{digest[:20]}; $(touch PWNED)", f"pw-{digest[20:40]}'\"`touch PWNED`"


def boot_spec_dags(home: Path) -> tuple[Callable[[Path], None], dict[str, str], dict[str, Any]]:
    pauses = home / "pauses"
    pauses.mkdir()
    secret = f"tok-{uuid.uuid4().hex}; $(touch PWNED)"

    def write(dags: Path) -> None:
        shutil.copy(REPO / "tests" / "e2e" / "settle_probe.py", dags.parent / "settle_probe.py")  # the triggerer's
        shutil.copy(REPO / "tests" / "e2e" / "stack_dags.py", dags / "stack_dags.py")

    env = {
        "OELLM_PAUSE_AT": f"after-sbatch,before-judging:{pauses}",
        "AIRFLOW_VAR_OELLM_TOKEN": secret,
        # a task whose worker died is noticed after this long (default 300 s)
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        # a dead scheduler's tasks are reset for another try this soon (defaults 30 s and 300 s)
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
        # a dead triggerer's triggers go to another this soon (default 30 s)
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
    }
    return write, env, {"pauses": pauses, "secret": secret, "dags": home / "dags"}


BOOT = {"airflow": boot_airflow, "faults": boot_spec_dags, "sqlite": boot_spec_dags}


def join(name: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The running stack `name`, booted here if no one has; one more module uses it."""
    from tests.e2e.conftest import Stack, start_stack

    state_dir = Path(os.environ[STATE_DIR_VARIABLE])
    with locked(state_dir, name):
        state = read_state(state_dir, name)
        if state is not None and name in CONTROLLED and state["owner"] != os.getpid():
            stop(state_dir, name)  # left by a worker that crashed: this one must control its own
            state = None
        if state is None:
            home = tmp_path_factory.mktemp(f"airflow-shared-{name}")
            dags = home / "dags"
            dags.mkdir()
            write_dags, env, attributes = BOOT[name](home)
            write_dags(dags)
            connections = {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW_CONN_")}
            stack = start_stack(home, dags, {**connections, **env}, production=name in PRODUCTION)
            try:
                if name == "airflow":
                    stack.login()
            except BaseException:
                stack.stop()
                raise
            for key, value in attributes.items():
                setattr(stack, key, value)
            LOCAL[name] = stack
            state = {  # what another worker needs to use it: no secret (the test looks for it in files)
                "home": str(home),
                "owner": os.getpid(),
                "env": {k: v for k, v in stack.env.items() if not k.startswith(SECRET_SETTINGS)},
                "base": stack.base,
                "access_token": stack.access_token,
                "folders": {k: str(v) for k, v in attributes.items() if isinstance(v, Path)},
                "users": 0,
            }
        local = LOCAL.get(name)
        if local is not None and str(local.home) == state["home"]:
            stack = copy.copy(local)
        else:
            stack = Stack(Path(state["home"]), state["env"], state["base"], access_token=state["access_token"])
            for key, value in state["folders"].items():
                setattr(stack, key, Path(value))
        state["users"] += 1
        write_state(state_dir, name, state)
        JOINED.add(name)
    return stack


def leave(name: str) -> None:
    state_dir = Path(os.environ[STATE_DIR_VARIABLE])
    with locked(state_dir, name):
        state = read_state(state_dir, name)
        if state is not None:
            state["users"] -= 1
            write_state(state_dir, name, state)


@pytest.fixture(scope="module")
def shared_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The shared stack of this module's group (MODULES), for this module's tests."""
    name = group_of(request.node.nodeid)
    if name is None:
        raise pytest.UsageError(f"{request.node.nodeid} is in no group of tests/shared_stack.py's MODULES")
    stack = join(name, tmp_path_factory)
    yield stack
    leave(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)  # the module fixtures' teardown first: a module leaves its stack there
    finally:
        stop_unused(nextitem)


def stop_unused(nextitem: pytest.Item | None) -> None:
    """Stop each stack this process joined that no module uses, unless the next test is one of its own."""
    if not JOINED:
        return
    state_dir = Path(os.environ[STATE_DIR_VARIABLE])
    for name in list(JOINED):
        if nextitem is not None and group_of(nextitem.nodeid) == name:
            continue
        with locked(state_dir, name):
            state = read_state(state_dir, name)
            if state is None or state["users"] <= 0:
                stop(state_dir, name)
            else:
                JOINED.discard(name)


def add_file(directory: Path, name: str, text: str) -> Path:
    """Write a file into a running stack's folder whole (renamed into place): its DAG processor never
    reads half of it."""
    path = directory / name
    partial = directory / f".{name}.partial"
    partial.write_text(text)
    partial.rename(path)
    return path
