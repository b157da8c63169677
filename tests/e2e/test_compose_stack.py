"""docker-compose.yaml's Airflow, run for real without a Docker engine: every component the compose file
declares (api-server, scheduler, dag-processor, triggerer, Celery worker) started with its `command` and the
environment the file declares, on this machine. What a container would have given differently is mapped,
and only that:

- the services' addresses: `postgres` and `redis` become scripts/prod-stack.sh's PostgreSQL and Redis (their
  port and credentials, a fresh database), `airflow-apiserver:8080` a free local port;
- `/opt/airflow-oellm` (where the image copies the project) becomes this checkout;
- what containers keep apart by themselves: each process's log-server and health-check ports, and the
  demo's output directory on the cluster (a directory of its own under the declared one);
- the SSH connection the image's entrypoint builds from the SLURM service's share is the dev cluster's.

Then an experiment of the demo sweep runs on the dev cluster through it, branches and cooldowns included,
and the UI's login takes the compose users.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import uuid
from pathlib import Path

import pytest
import yaml

from airflow_oellm.config import load_sweep
from tests.conftest import REPO
from tests.e2e.conftest import Stack, free_port, production_services, wait

pytestmark = [pytest.mark.e2e, pytest.mark.demo, pytest.mark.cluster, pytest.mark.slow]

COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
COMPONENTS = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker")
IMAGE_ROOT = "/opt/airflow-oellm"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolated(value: str, environ: dict[str, str]) -> str:
    """Compose's `${NAME}` and `${NAME:-default}` (a set, non-empty variable wins)."""
    return _VARIABLE.sub(lambda m: environ.get(m["name"]) or (m["default"] or ""), value)


def mapped_url(value: str, services: dict[str, tuple[str, int, str | None]]) -> str:
    """A URL naming a compose service, pointed at the service's stand-in: its host and port, and its
    credentials where it has its own (`user:password`)."""
    scheme, _, rest = value.partition("+") if value.startswith("db+") else ("", "", value)
    parts = urllib.parse.urlsplit(rest)
    if parts.hostname not in services:
        return value
    host, port, credentials = services[parts.hostname]
    userinfo = credentials if credentials is not None else parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if "@" in parts.netloc or credentials else f"{host}:{port}"
    return (f"{scheme}+" if scheme else "") + urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def compose_environment(service: str, services: dict[str, tuple[str, int, str | None]]) -> dict[str, str]:
    declared = COMPOSE["services"][service]["environment"]
    env = {}
    for key, value in declared.items():
        text = interpolated(str(value), dict(os.environ))
        text = mapped_url(text, services)
        env[key] = text.replace(IMAGE_ROOT, str(REPO))
    return env


@pytest.fixture
def compose_stack(dev_cluster, cluster_tools, slurm_conn_id, tmp_path):
    # the connection the image's entrypoint defines from the SLURM service's share, to the dev cluster here
    assert (
        slurm_conn_id == "slurm_dev" and "AIRFLOW_CONN_SLURM_DEV" in (REPO / "docker/airflow/entrypoint.sh").read_text()
    )
    pg = production_services()
    server = urllib.parse.urlsplit(pg["OELLM_PROD_PG_URL"])
    database = f"airflow_compose_{uuid.uuid4().hex[:8]}"
    redis = urllib.parse.urlsplit(pg["OELLM_PROD_REDIS_URL"])
    port = free_port()
    services = {
        "postgres": (server.hostname, server.port, f"{server.username}:{server.password}"),
        "redis": (redis.hostname, redis.port, None),
        "airflow-apiserver": ("127.0.0.1", port, None),
    }
    env = compose_environment("airflow-scheduler", services)
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        env[key] = env[key].rsplit("/", 1)[0] + f"/{database}"  # a fresh database, not the compose's `airflow`
    for name in COMPONENTS:  # one environment for all, as the file's anchor says
        other = compose_environment(name, services)
        other.pop("DUMB_INIT_SETSID", None)  # the worker's container init; no meaning here
        for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
            other[key] = env[key]
        assert other == env, name
    import psycopg2

    admin = psycopg2.connect(f"postgresql://{server.netloc}/postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    admin.close()
    # a run of its own on the cluster (stable names would resume an earlier run's checkpoints): under
    # the declared directory, as a fresh volume would be
    env["OELLM_DEMO_OUTPUT_DIR"] += f"/{database}"
    home = tmp_path / "home"
    home.mkdir()
    machine = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") or k == "AIRFLOW_CONN_SLURM_DEV"}
    env = {
        **machine,
        **env,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
    }
    commands = {name: tuple(COMPOSE["services"][name]["command"].split()) for name in COMPONENTS}
    process_env = {
        name: {
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        for name in COMPONENTS
    }
    stack = Stack(home, env, f"http://127.0.0.1:{port}/api/v2", commands, process_env)
    try:
        init = COMPOSE["services"]["airflow-init"]["environment"]
        assert init["_AIRFLOW_DB_MIGRATE"] == "true"  # what the image's entrypoint runs for airflow-init
        stack.cli("db", "migrate", timeout=300)
        for name in COMPONENTS:
            stack.start(name)

        wait(stack.healthy, 240, "every component healthy", stack)
        yield stack
    finally:
        stack.stop()  # and its database


def test_the_compose_environment_runs_a_demo_experiment_and_logs_in(compose_stack):
    stack = compose_stack
    users = dict(u.split(":") for u in stack.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(","))
    passwords = json.loads(Path(stack.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())
    assert set(users) == {"admin"} and passwords["admin"] == "admin"  # the compose file's documented login
    stack.login("admin", passwords["admin"])  # the UI's login, with the compose file's credentials
    # one experiment of the demo sweep, with its checkpoint branches and cooldown: the whole sweep takes minutes
    # of both cores alone (`make demo` runs it), more than a test's budget beside the others
    experiment = load_sweep(REPO / "examples" / "demo" / "demo.yaml").experiments[0]
    wait(lambda: stack.http("GET", f"/dags/{experiment.dag_id}"), 300, "the demo sweep's DAGs", stack)
    assert stack.http("GET", "/dags/oellm__demo")["dag_id"] == "oellm__demo"
    run_id = stack.trigger(experiment.dag_id)
    assert stack.wait_run(experiment.dag_id, run_id, 280) == "success", stack.explain(experiment.dag_id, run_id)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in stack.task_instances(experiment.dag_id, run_id)}
    assert {state for state in states.values()} <= {"success", "skipped"}, states
    assert sum(task == "cooldown.train" for task, _ in states) == 1, states  # the branches ran too
    assert stack.xcom(experiment.dag_id, run_id, "train")["last_iteration"] == 200
    # the tasks ran on the compose file's Celery worker
    worker = (stack.home / "airflow-worker.log").read_text(errors="replace")
    assert worker.count("execute_workload") >= len(states) // 2, worker[-3000:]
