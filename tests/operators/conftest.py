"""dag.test() against the real dev cluster: an Airflow metadata DB per test session, DAGs serialized on demand."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

FAKE_MEGATRON = REPO / "tests" / "fixtures" / "fake_megatron.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.operators)
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.utils import db

    db.resetdb()
    DagBundlesManager().sync_bundles_to_db()


@pytest.fixture
def run_dag(airflow_db) -> Callable[..., Any]:
    """Serialize a DAG built in the test and run it with dag.test(); returns the DagRun."""
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

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
