"""Where the suite's time goes: at the end of a run, the total, the slowest tests and a per-marker table.

A test's time is its setup, call and teardown together, so a module- or session-scoped fixture is charged to
the test that first needed it. A test with several markers counts in each of their rows; tests under
tests/unit/ carry the `unit` marker. `OELLM_TEST_TIMES=path.json` also writes every test's time and markers,
for comparing two runs (`scripts/test_times.py`).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

SLOWEST_SHOWN = 25
# No single test may be declared with a longer timeout than this (tests/unit/test_suite_budget.py).
MAX_TEST_TIMEOUT_SECONDS = 300


class SuiteTimes:
    def __init__(self, config: pytest.Config) -> None:
        self.registered = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
        self.seconds: dict[str, float] = defaultdict(float)
        self.markers: dict[str, set[str]] = {}
        self.outcome: dict[str, str] = {}
        self.started = time.monotonic()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # report.keywords carries the markers on the controller under xdist too
        self.seconds[report.nodeid] += report.duration
        self.markers[report.nodeid] = {name for name in report.keywords if name in self.registered}
        if report.failed or report.when == "call" or report.nodeid not in self.outcome:
            self.outcome[report.nodeid] = report.outcome

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.seconds:
            return
        write = terminalreporter.write_line
        total = time.monotonic() - self.started
        summed = sum(self.seconds.values())
        terminalreporter.section("where the time went")
        write(f"wall {total:.0f} s; tests' own time {summed:.0f} s over {len(self.seconds)} tests")
        write(f"slowest {SLOWEST_SHOWN} (setup + call + teardown):")
        for nodeid, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:SLOWEST_SHOWN]:
            write(f"  {seconds:8.1f} s  {nodeid}")
        rows: dict[str, list[float]] = defaultdict(list)
        for nodeid, seconds in self.seconds.items():
            for name in self.markers[nodeid] or {"(none)"}:
                rows[name].append(seconds)
        write("per marker (a test counts under each of its markers):")
        write(f"  {'marker':<12} {'tests':>6} {'seconds':>9} {'slowest':>9}")
        for name, times in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
            write(f"  {name:<12} {len(times):>6} {sum(times):>9.0f} {max(times):>9.1f}")
        out = os.environ.get("OELLM_TEST_TIMES")
        if out:
            Path(out).write_text(
                json.dumps(
                    {
                        "wall_seconds": round(total, 1),
                        "tests": {
                            nodeid: {
                                "seconds": round(seconds, 2),
                                "markers": sorted(self.markers[nodeid]),
                                "outcome": self.outcome[nodeid],
                            }
                            for nodeid, seconds in sorted(self.seconds.items())
                        },
                    },
                    indent=1,
                )
            )
            write(f"every test's time: {out}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SuiteTimes(config), "oellm-test-times")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/unit/" in item.nodeid:
            item.add_marker(pytest.mark.unit)
