"""`make demo` from a clean clone, timed, then screenshots of the finished sweep in the Airflow UI
(headless Chromium, installed with apt when missing) to see that the runs are green.

    .venv/bin/python benchmarks/demo_run.py [--keep]

Writes benchmarks/results/demo_run.json and the screenshots beside it (never committed). The clone's
Airflow is stopped afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from airflow_oellm.config import naming  # noqa: E402
from tests.browser import Browser  # noqa: E402 - the repository root is put on the path first

RESULTS = REPO / "benchmarks" / "results"


async def screenshots(base: str, token: str, pages: dict[str, str], out_dir: Path) -> list[str]:
    """Open each page with the UI's login cookie set and save a PNG."""
    saved = []
    async with Browser() as browser:
        await browser.login(base, token)
        for name, path in pages.items():
            await browser.open(f"{base}{path}", settle=8)  # the UI renders client-side from API calls
            saved.append(str(await browser.screenshot(out_dir / f"demo_{name}.png", full_page=False)))
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the clone's Airflow running")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    clone = Path(tempfile.mkdtemp(prefix="oellm-demo-clone-")) / "airflow-oellm"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    started = time.monotonic()
    done = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    (RESULTS / "demo_run.log").write_text(done.stdout + done.stderr)
    result: dict[str, object] = {"wall_seconds": round(wall, 1), "exit_code": done.returncode, "clone": str(clone)}
    ui = re.search(r"Airflow UI: (\S+)\s+\(user (\S+), password (\S+)\)", done.stdout)
    if ui:
        base, user, password = ui.groups()
        request = urllib.request.Request(
            f"{base}/auth/token",
            data=json.dumps({"username": user, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        token = json.load(urllib.request.urlopen(request, timeout=30))["access_token"]
        pages = {
            "dags": "/dags",
            "sweep": f"/dags/{naming.sweep_dag_id('demo')}",
            "experiment": f"/dags/{naming.dag_id('demo', 'tiny_lr0.01')}",
        }
        result["screenshots"] = asyncio.run(screenshots(base, token, pages, RESULTS))
    if not args.keep:
        subprocess.run(["make", "demo-stop"], cwd=clone, capture_output=True, timeout=120)
    (RESULTS / "demo_run.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
