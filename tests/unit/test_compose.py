"""docker-compose.yaml, validated without a Docker engine (none exists on CI machines): services and their
wiring, build contexts and every file the Dockerfiles copy, healthchecks, the Airflow settings, the
entrypoints, the SSH connection they build, and the demo sweep under the compose environment."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.demo

COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
    "flower": "celery flower",
}


def test_the_official_layout_plus_a_slurm_service():
    assert set(SERVICES) == {"postgres", "redis", "slurm", "airflow-init", *AIRFLOW}
    assert SERVICES["flower"]["profiles"] == ["flower"] and SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "profiles" not in SERVICES["airflow-worker"]  # a plain `docker compose up` has a worker
    for name, command in AIRFLOW.items():
        assert SERVICES[name]["command"] == command
        assert SERVICES[name]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
    for name, service in SERVICES.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            assert rule["condition"] in ("service_healthy", "service_completed_successfully")
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
        if name != "airflow-init":
            check = service["healthcheck"]["test"]
            assert check[0] in ("CMD", "CMD-SHELL") and len(check) > 1, name
    assert set(COMPOSE["volumes"]) >= {
        v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", []) if not v.startswith((".", "/", "$"))
    }
    assert SERVICES["airflow-apiserver"]["ports"] == ["127.0.0.1:8080:8080"]  # local use only


def _copies(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            words = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_build_contexts_dockerfiles_and_copied_files_exist():
    builds = [s["build"] for s in SERVICES.values() if "build" in s]
    assert len({b["dockerfile"] for b in builds}) == 2
    ignored = set((REPO / ".dockerignore").read_text().split())
    for build in builds:
        context = (REPO / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        entry = next(line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT"))
        script = json.loads(entry.split(" ", 1)[1])[0].replace("/opt/airflow-oellm", str(REPO))
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["bash", "-n", script]).returncode == 0
        for source in _copies(dockerfile):
            assert (context / source).exists(), (dockerfile, source)
            assert source.split("/")[0] not in ignored, (dockerfile, source)
    # the SLURM image runs CI's own dev-cluster scripts, with sshd open to the compose network
    slurm = (REPO / "docker" / "slurm" / "Dockerfile").read_text()
    assert "scripts/dev-cluster.sh up" in slurm and "scripts/dev-cluster.sh tools" in slurm
    assert "SLURM_DEV_SSH_LISTEN=0.0.0.0" in (REPO / "docker" / "slurm" / "entrypoint.sh").read_text()
    assert "ListenAddress $SLURM_DEV_SSH_LISTEN" in (REPO / "scripts" / "dev-cluster" / "up.sh").read_text()


def test_airflow_settings_agree_with_the_services():
    env = SERVICES["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    pg = SERVICES["postgres"]["environment"]
    # the metadata database and Celery's result backend: the PostgreSQL service, psycopg2 named
    for url in (env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+")):
        db = urllib.parse.urlsplit(url)
        assert db.scheme == "postgresql+psycopg2"
        assert (db.hostname, db.username, db.password, db.path.lstrip("/")) == (
            "postgres",
            pg["POSTGRES_USER"],
            pg["POSTGRES_PASSWORD"],
            pg["POSTGRES_DB"],
        )
    broker = urllib.parse.urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    api = urllib.parse.urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert api.hostname == "airflow-apiserver" and f"{api.port}:{api.port}" in SERVICES["airflow-apiserver"]["ports"][0]
    assert (
        env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow-oellm/dags" and (REPO / "dags" / "oellm_sweeps.py").exists()
    )
    assert env["OELLM_SWEEPS_PATH"] == "/opt/airflow-oellm/examples/demo"
    passwords = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].replace("/opt/airflow-oellm", str(REPO))
    users = dict(u.split(":") for u in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(","))
    assert set(json.loads(Path(passwords).read_text())) == set(users)
    for name in ("airflow-init", *AIRFLOW):  # every component shares one environment (JWT secret, DB, broker)
        assert SERVICES[name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert SERVICES["airflow-init"]["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"


def test_the_connection_pins_the_slurm_services_host_key(tmp_path, monkeypatch):
    from airflow.models.connection import Connection

    host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx1bW9ja2tleWZvcnRlc3RpbmdvbmVsbG1yZXBvMDAw"
    (tmp_path / "host_ed25519.pub").write_text(f"{host_key} root@slurm\n")
    (tmp_path / "id_ed25519").write_text("key")
    script = REPO / "docker" / "airflow" / "slurm_connection.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True)
    conn = Connection.from_json(out.stdout, conn_id="slurm_dev")
    assert (conn.conn_type, conn.host, conn.port, conn.login) == (
        "ssh",
        SERVICES["slurm"]["hostname"],
        2222,
        "slurmuser",
    )
    assert conn.extra_dejson == {"key_file": str(tmp_path / "id_ed25519"), "host_key": host_key}
    entrypoint = (REPO / "docker" / "airflow" / "entrypoint.sh").read_text()
    assert "AIRFLOW_CONN_SLURM_DEV" in entrypoint and "exec /entrypoint" in entrypoint
    share = SERVICES["slurm"]["environment"]["OELLM_SSH_SHARE"]
    assert f"oellm-ssh:{share}" in SERVICES["slurm"]["volumes"]
    assert f"oellm-ssh:{share}:ro" in SERVICES["airflow-scheduler"]["volumes"]


def test_the_demo_sweep_loads_with_the_compose_environment(monkeypatch):
    from airflow_oellm.config import load_sweep

    env = SERVICES["airflow-dag-processor"]["environment"]
    for key, value in env.items():
        if key.startswith("OELLM_"):
            monkeypatch.setenv(key, value)
    sweep = load_sweep(REPO / "examples" / "demo" / "demo.yaml")
    assert len(sweep.experiments) == 4
    cfg = sweep.experiments[0].config
    assert cfg.platform.ssh_conn_id == "slurm_dev" and cfg.platform.batch_system == "slurm"
    assert cfg.backend.megatron_path == env["OELLM_TINY_MEGATRON"]
    assert cfg.backend.python == f"{env['OELLM_DEMO_TOOLS_BIN']}/python"
    assert sweep.experiments[0].paths.output_dir.startswith(env["OELLM_DEMO_OUTPUT_DIR"])


def test_the_airflow_image_matches_the_lock():
    dockerfile = (REPO / "docker" / "airflow" / "Dockerfile").read_text()
    lock = next((REPO / "constraints").glob("airflow-*-py3.11.txt"))
    pins = dict(
        line.split("==", 1) for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    assert f"FROM apache/airflow:{pins['apache-airflow']}-python3.11" in dockerfile
    # with the production extra: the Celery provider and the PostgreSQL drivers, at the lock's versions
    assert f'-c /opt/airflow-oellm/constraints/{lock.name} "/opt/airflow-oellm[production]"' in dockerfile
