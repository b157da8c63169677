"""`make demo` from a clean clone, timed, then screenshots of the finished sweep in the Airflow UI
(headless Chromium, installed with apt when missing) to see that the runs are green.

    .venv/bin/python benchmarks/demo_run.py [--keep]

Writes benchmarks/results/demo_run.json and the screenshots beside it (never committed). The clone's
Airflow is stopped afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
            check=True,
            capture_output=True,
        )
        found = shutil.which("chromium")
    if not found:
        raise SystemExit("chromium is not available")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def screenshots(base: str, token: str, pages: dict[str, str], out_dir: Path) -> list[str]:
    """Open each page with the UI's login cookie set (over the DevTools protocol) and save a PNG."""
    import websockets

    port = free_port()
    profile = tempfile.mkdtemp(prefix="oellm-chromium-")
    browser = subprocess.Popen(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={profile}",
            "--window-size=1500,950",
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20) as ws:
            counter = 0

            async def call(method: str, **params: object) -> dict:
                nonlocal counter
                counter += 1
                await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("id") == counter:
                        return reply.get("result", {})

            await call("Network.enable")
            await call("Network.setCookie", name="_token", value=token, url=base)
            for name, path in pages.items():
                await call("Page.navigate", url=f"{base}{path}")
                await asyncio.sleep(8)  # the UI renders client-side from API calls
                shot = await call("Page.captureScreenshot", format="png")
                target = out_dir / f"demo_{name}.png"
                target.write_bytes(base64.b64decode(shot["data"]))
                saved.append(str(target))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
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
        pages = {"dags": "/dags", "sweep": "/dags/oellm__demo", "experiment": "/dags/oellm__demo__tiny_lr0.01"}
        result["screenshots"] = asyncio.run(screenshots(base, token, pages, RESULTS))
    if not args.keep:
        subprocess.run(["make", "demo-stop"], cwd=clone, capture_output=True, timeout=120)
    (RESULTS / "demo_run.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
