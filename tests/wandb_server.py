"""A W&B server on 127.0.0.1 for the tracking tests: openwandb, which speaks W&B's API to the real wandb client,
in place of W&B's cloud (this machine has no internet). Installed with the cluster's W&B tools
(scripts/dev-cluster/wandb.sh); the `wandb_server` fixture is in tests/conftest.py."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# openwandb's built-in key: what WANDB_API_KEY must hold to talk to it
API_KEY = "local0000000000000000000000000000000000000000"


class WandbServer:
    """openwandb serving from `data_dir` on a free port of 127.0.0.1."""

    def __init__(self, bin_dir: Path, data_dir: Path, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.database = data_dir / "openwandb.db"
        self.log = log
        self.process = subprocess.Popen(
            [str(bin_dir / "openwandb"), "serve", "--host", "127.0.0.1", "-p", str(port), "--data-dir", str(data_dir)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"openwandb did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)  # the server is starting: ask again

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def steps(self, run_id: str, key: str) -> list[int]:
        """Every step logged for `key` in the run, in order, once per row the server holds (a run pushed
        twice would hold its rows twice)."""
        with sqlite3.connect(self.database) as db:
            rows = db.execute(
                "SELECT step FROM metrics WHERE run_id = ? AND key = ? ORDER BY step, id", (run_id, key)
            ).fetchall()
        return [step for (step,) in rows]

    def runs(self) -> list[tuple[str, str, str]]:
        """(run id, name, project name) of every run the server holds."""
        with sqlite3.connect(self.database) as db:
            return db.execute(
                "SELECT runs.run_id, runs.display_name, projects.name FROM runs "
                "JOIN projects ON runs.project_id = projects.id"
            ).fetchall()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
