"""Fixtures for the real dev cluster (scripts/dev-cluster.sh up): SLURM + sshd on 127.0.0.1, via OpenSSH.

These tests fail, rather than skip, when the cluster is not up: a cluster test that silently
does not run proves nothing. Deselect them with `-m "not cluster"`.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

STATE_DIR = Path(os.environ.get("SLURM_DEV_STATE_DIR", "/var/lib/slurm-dev"))
TOOLS_STAMP = Path(tempfile.gettempdir()) / "oellm-dev-tools.installed"  # test run id, bin directory
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


@dataclass
class DevCluster:
    env: dict[str, str]

    @property
    def ssh_config(self) -> str:
        return self.env["SLURM_DEV_SSH_CONFIG"]

    def ssh(
        self, command: str | Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the login node. A list is quoted word by word; a string is sent as is."""
        remote = command if isinstance(command, str) else shlex.join(command)
        argv = ["ssh", "-F", self.ssh_config, "-o", "ConnectTimeout=10", "slurm-dev", remote]
        for attempt in range(5):  # other programs share this machine: retry a refused connect briefly
            result = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
            if result.returncode != 255:
                break
            time.sleep(0.5 * (attempt + 1))  # ssh itself failed (255): back off, then again
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {remote!r} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def upload(self, path: str, text: str, mode: str = "0600") -> None:
        self.ssh(
            f"umask 077 && mkdir -p {shlex.quote(str(Path(path).parent))} && cat > {shlex.quote(path)} "
            f"&& chmod {mode} {shlex.quote(path)}",
            input=text,
        )

    def sbatch(self, script_path: str) -> str:
        out = self.ssh(["sbatch", "--parsable", script_path]).stdout.strip()
        return out.split(";", 1)[0]

    def wait_terminal(self, job_ids: Sequence[str], timeout: float = 240) -> dict[str, tuple[str, str]]:
        """{job id: (state, exit code)} once every job is finished, from sacct."""
        deadline = time.monotonic() + timeout
        states: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            out = self.ssh(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,ExitCode"]).stdout
            states = {}
            for line in out.splitlines():
                job, state, code = line.split("|")
                states[job] = (state.split()[0], code)
            if len(states) == len(job_ids) and all(s in TERMINAL for s, _ in states.values()):
                return states
            time.sleep(1)  # poll
        raise AssertionError(f"jobs not finished after {timeout}s: {states}")


@pytest.fixture(scope="session")
def dev_cluster() -> DevCluster:
    env_file = STATE_DIR / "cluster.env"
    if not env_file.exists():
        pytest.fail(f"dev cluster not set up ({env_file} missing): run scripts/dev-cluster.sh up")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    cluster = DevCluster(env)
    probe = cluster.ssh("sinfo -h -o %t", check=False)
    if probe.returncode != 0:
        pytest.fail(f"dev cluster not reachable over ssh: {probe.stderr.strip()} (run scripts/dev-cluster.sh up)")
    return cluster


@pytest.fixture(scope="session")
def cluster_tools(dev_cluster: DevCluster) -> Path:
    """`airflow-oellm` (with the convert/evaluate extras) installed where cluster jobs can run it.
    Once per test run: xdist workers take turns, and the later ones find it done (reinstalling would
    pull the tiny trainer from under a running job)."""
    repo = Path(__file__).resolve().parents[1]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid-{os.getpid()}"
    with open(TOOLS_STAMP.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        installed = TOOLS_STAMP.read_text().split("\n") if TOOLS_STAMP.exists() else []
        if installed[:1] != [run]:
            done = subprocess.run(
                ["bash", str(repo / "scripts" / "dev-cluster.sh"), "tools"], capture_output=True, text=True, timeout=900
            )
            if done.returncode:
                pytest.fail(f"scripts/dev-cluster.sh tools failed: {done.stderr[-2000:]}")
            installed = [run, done.stdout.strip().splitlines()[-1]]
            TOOLS_STAMP.write_text("\n".join(installed))
    return Path(installed[1]) / "airflow-oellm"


def _remote_dir(cluster: DevCluster) -> Iterator[str]:
    path = f"{cluster.env['SLURM_DEV_USER_HOME']}/oellm-tests/{uuid.uuid4().hex[:12]}"
    cluster.ssh(["mkdir", "-p", path])
    yield path
    cluster.ssh(["rm", "-rf", path], check=False)


@pytest.fixture
def remote_dir(dev_cluster: DevCluster) -> Iterator[str]:
    """A fresh directory in the SSH user's home, removed afterwards."""
    yield from _remote_dir(dev_cluster)


@pytest.fixture(scope="module")
def module_remote_dir(dev_cluster: DevCluster) -> Iterator[str]:
    yield from _remote_dir(dev_cluster)


def host_key(cluster: DevCluster, key_type: str = "ssh-ed25519") -> str:
    for line in Path(cluster.env["SLURM_DEV_SSH_KNOWN_HOSTS"]).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == key_type:
            return f"{parts[1]} {parts[2]}"
    raise AssertionError(f"no {key_type} host key in {cluster.env['SLURM_DEV_SSH_KNOWN_HOSTS']}")


def ssh_connection_uri(cluster: DevCluster, key: str | None = None) -> str:
    """An Airflow SSH connection to the dev cluster with the host key pinned (verified)."""
    import json

    return json.dumps(
        {
            "conn_type": "ssh",
            "host": cluster.env["SLURM_DEV_SSH_HOST"],
            "port": int(cluster.env["SLURM_DEV_SSH_PORT"]),
            "login": cluster.env["SLURM_DEV_SSH_USER"],
            "extra": {"key_file": cluster.env["SLURM_DEV_SSH_KEY"], "host_key": key or host_key(cluster)},
        }
    )


@pytest.fixture(scope="session")
def slurm_conn_id(dev_cluster: DevCluster) -> str:
    """`slurm_dev`: an Airflow connection (environment variable) to the dev cluster."""
    os.environ["AIRFLOW_CONN_SLURM_DEV"] = ssh_connection_uri(dev_cluster)
    return "slurm_dev"
