"""dag.test() against the real dev cluster: an Airflow metadata DB per test session, DAGs serialized on demand."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from airflow_oellm.localjobs.cli import COMMANDS
from airflow_oellm.localjobs.store import JobStore, node_name
from airflow_oellm.slurm.target import ClusterTarget
from tests.conftest import REPO

FAKE_MEGATRON = REPO / "tests" / "fixtures" / "fake_megatron.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.operators)
            callspec = getattr(item, "callspec", None)
            if not (callspec and callspec.params.get("backend") == "local-process"):
                item.add_marker(pytest.mark.cluster)


@dataclass
class Backend:
    """Where an operator test's jobs run: the dev SLURM cluster over SSH, or local processes (no SLURM)."""

    batch_system: str
    platform: str  # the config/platform/<name>.yaml the test's experiment uses
    conn: dict[str, Any]  # operator/sensor keyword arguments naming the connection
    work_dir: str  # a fresh directory the jobs can write
    fake_megatron: str
    node: str  # the node jobs run on
    cluster: Any = None  # the DevCluster, for the slurm backend

    def run(self, argv: list[str]) -> str:
        """Run a command where the jobs run (SLURM's commands are the local batch system's on `local-process`)."""
        if self.cluster is not None:
            return self.cluster.ssh(argv).stdout
        if argv[0] in COMMANDS:
            argv = [sys.executable, "-m", "airflow_oellm.localjobs", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout

    def succeeds(self, argv: list[str]) -> bool:
        if self.cluster is not None:
            return self.cluster.ssh(argv, check=False).returncode == 0
        return subprocess.run(argv, capture_output=True, timeout=60).returncode == 0

    def provide(self, local_file: Path) -> str:
        """A file of this repository where the jobs can read it."""
        if self.cluster is None:
            return str(local_file)
        path = f"{self.work_dir}/{local_file.name}"
        self.cluster.upload(path, local_file.read_text(), mode="0644")
        return path


@pytest.fixture(params=["slurm", "local-process"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if request.param == "slurm":
        cluster = request.getfixturevalue("dev_cluster")
        yield Backend(
            batch_system="slurm",
            platform="devcluster",
            conn={"cluster": ClusterTarget(request.getfixturevalue("slurm_conn_id"))},
            work_dir=request.getfixturevalue("remote_dir"),
            fake_megatron=request.getfixturevalue("fake_megatron"),
            node=cluster.env["SLURM_DEV_NODE"],
            cluster=cluster,
        )
        return
    monkeypatch.setenv("OELLM_LOCAL_JOBS_DIR", str(tmp_path / "local-jobs"))
    monkeypatch.setenv("OELLM_LOCAL_KILL_WAIT", "10")
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    yield Backend(
        batch_system="local-process",
        platform="local-process",
        conn={"cluster": ClusterTarget(batch_system="local-process")},
        work_dir=str(work_dir),
        fake_megatron=str(FAKE_MEGATRON),
        node=node_name(),
    )
    leftovers = [r.job_id for r in JobStore(tmp_path / "local-jobs").records() if r.is_active]
    if leftovers:  # a failed test must not leave jobs running
        subprocess.run([sys.executable, "-m", "airflow_oellm.localjobs", "scancel", *leftovers], check=False)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.utils import db

    db.resetdb()
    DagBundlesManager().sync_bundles_to_db()


@pytest.fixture
def run_dag(airflow_db, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Serialize a DAG built in the test and run it with dag.test(); returns the DagRun.

    dag.test() runs a deferred task's trigger in line, with no executor: the race the settle hold
    covers cannot happen there, so the hold is off (the e2e stacks keep the default)."""
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    monkeypatch.setenv("AIRFLOW__OELLM__DEFER_SETTLE_SECONDS", "0")

    def _run(dag: Any, conf: dict[str, Any] | None = None) -> Any:
        bag = DagBag(dag_folder=None, collect_dags=False)
        bag.bag_dag(dag)
        sync_bag_to_db(bag, bundle_name="dags-folder", bundle_version=None)
        return dag.test(run_conf=conf or {})

    return _run


@pytest.fixture
def fake_megatron(dev_cluster, remote_dir) -> str:
    path = f"{remote_dir}/fake_megatron.py"
    dev_cluster.upload(path, FAKE_MEGATRON.read_text(), mode="0644")
    return path


def unique_dag_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def xcom(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key=key, map_index=map_index)
            .first()
        )
        return None if row is None else XComModel.deserialize_value(row)


def start_date() -> datetime:
    return datetime(2026, 1, 1)


def attempt_history(dag_run: Any, task_id: str, map_index: int = -1) -> dict[str, Any] | None:
    """The attempts a submit task recorded in Airflow's task state store (kept across its tries)."""
    from airflow.models.task_state_store import TaskStateStoreModel
    from airflow.utils.session import create_session

    from airflow_oellm.config.naming import HISTORY_KEY

    with create_session() as session:
        row = (
            session.query(TaskStateStoreModel)
            .filter_by(dag_run_id=dag_run.id, task_id=task_id, map_index=map_index, key=HISTORY_KEY)
            .first()
        )
        return None if row is None else (json.loads(row.value) if isinstance(row.value, str) else row.value)
