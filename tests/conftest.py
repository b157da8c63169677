"""Shared fixtures. Cluster fixtures live in tests/cluster/conftest.py."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.wandb_server import WandbServer
from tests.webhook import Receiver

# Airflow reads its home when first imported: give the whole test run a fresh one, never ~/airflow.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="oellm-test-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_AIRFLOW_HOME, "dags")
os.makedirs(os.environ["AIRFLOW__CORE__DAGS_FOLDER"], exist_ok=True)
atexit.register(shutil.rmtree, _AIRFLOW_HOME, True)

pytest_plugins = [
    "tests.cluster_fixtures",
    "tests.reliability",
    "tests.timing",
    "tests.shared_stack",
    "tests.parallel",
]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
EXAMPLE_SWEEPS = sorted((CONFIG / "sweeps").glob("*.yaml"))


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write("config/sweeps/x.yaml", yaml_text) -> path under tmp_path (dedented)."""

    def _write(relative: str, text: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return _write


SITE_ACCOUNTS = {
    "LUMI_PROJECT": "project_465000123",
    "LEONARDO_PROJECT": "AIFAC_L01_028",
    "JUWELS_PROJECT": "oellm-jwb",
    "JUPITER_PROJECT": "oellm-jup",
    "MARENOSTRUM_PROJECT": "ehpc123",
}


@pytest.fixture
def site_accounts(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The project accounts the built-in sites require, exported as a user does on the Airflow host."""
    for name, value in SITE_ACCOUNTS.items():
        monkeypatch.setenv(name, value)
    return SITE_ACCOUNTS


@pytest.fixture
def project(write: Callable[[str, str], Path], tmp_path: Path) -> Path:
    """A small project config root with its own platform group (`config/platform/mini.yaml`)."""
    write(
        "config/platform/mini.yaml",
        """
        defaults:
          - base
          - _self_
        platform:
          name: mini
        slurm:
          partition: debug
        backend:
          launcher: none
        """,
    )
    return tmp_path / "config"


@pytest.fixture(scope="session")
def wandb_tools() -> Path:
    """The bin directory of wandb and openwandb, where the dev cluster's job user can run them (once per run)."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "dev-cluster.sh"), "wandb"], capture_output=True, text=True, timeout=900
    )
    if done.returncode:
        pytest.fail(f"scripts/dev-cluster.sh wandb failed: {done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def wandb_server(wandb_tools: Path, tmp_path: Path) -> Iterator[WandbServer]:
    (tmp_path / "openwandb").mkdir()
    server = WandbServer(wandb_tools, tmp_path / "openwandb", tmp_path / "openwandb.log")
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
