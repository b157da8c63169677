"""Headless Chromium over the DevTools protocol: open pages with the Airflow UI's login cookie, read
the DOM with JavaScript, save screenshots. Used by the dashboard's end-to-end test and the demo benchmark."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def chromium() -> str:
    """Debian's chromium, installed with apt when missing."""
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
        raise RuntimeError("chromium is not available")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium with one page; `async with Browser() as b: await b.open(url)`."""

    def __init__(self, width: int = 1500, height: int = 950) -> None:
        self.size = (width, height)
        self._counter = 0

    async def __aenter__(self) -> Browser:
        import websockets

        port = _free_port()
        self._profile = tempfile.mkdtemp(prefix="oellm-chromium-")
        self._process = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-component-update",
                f"--user-data-dir={self._profile}",
                f"--window-size={self.size[0]},{self.size[1]}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    self._stop()
                    raise
                await asyncio.sleep(0.5)  # poll: Chromium is starting
        self._ws = await websockets.connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        await self.call("Page.enable")
        await self.call("Network.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ws.close()
        self._stop()

    def _stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._counter += 1
        ident = self._counter
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            reply = json.loads(await self._ws.recv())
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def login(self, base: str, token: str) -> None:
        """The cookie the Airflow UI keeps its JWT in."""
        await self.call("Network.setCookie", name="_token", value=token, url=base)

    async def open(self, url: str, settle: float = 0.5, timeout: float = 30) -> None:
        """Navigate and wait until the document has loaded."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while await self.evaluate("document.readyState") != "complete" or await self.evaluate("location.href") != url:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in {timeout} s")
            await asyncio.sleep(0.2)  # poll
        await asyncio.sleep(settle)  # scripts run after load: let them draw

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, target: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            metrics = await self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.call("Page.captureScreenshot", **params)
        target.write_bytes(base64.b64decode(shot["data"]))
        return target
