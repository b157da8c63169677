"""Where the suite's time goes: at the end of a run, the total, the slowest tests and a per-marker table.

A test's time is its setup, call and teardown together (under xdist, on its worker), so a module- or
session-scoped fixture is charged to the test that first needed it. A test with several markers counts in
each of their rows; tests under tests/unit/ carry the `unit` marker. `OELLM_TEST_TIMES=path.json` also
writes every test's time and markers, and `python -m tests.timing A.json B.json` sums several runs (CI's
shared and exclusive passes).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

SLOWEST_SHOWN = 25
# No single test may be declared with a longer timeout than this (tests/unit/test_suite_budget.py).
MAX_TEST_TIMEOUT_SECONDS = 300
MARKER_PROPERTY = "oellm_marker"


class SuiteTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.markers: dict[str, set[str]] = {}
        self.outcome: dict[str, str] = {}
        self.started = time.monotonic()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration
        self.markers[report.nodeid] = {value for key, value in report.user_properties if key == MARKER_PROPERTY}
        if report.failed or report.when == "call" or report.nodeid not in self.outcome:
            self.outcome[report.nodeid] = report.outcome

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.seconds:
            return
        tests = {
            nodeid: {
                "seconds": round(seconds, 2),
                "markers": sorted(self.markers[nodeid]),
                "outcome": self.outcome[nodeid],
            }
            for nodeid, seconds in sorted(self.seconds.items())
        }
        wall = round(time.monotonic() - self.started, 1)
        terminalreporter.section("where the time went")
        for line in summary(tests, wall):
            terminalreporter.write_line(line)
        out = os.environ.get("OELLM_TEST_TIMES")
        if out:
            Path(out).write_text(json.dumps({"wall_seconds": wall, "tests": tests}, indent=1))
            terminalreporter.write_line(f"every test's time: {out}")


def summary(tests: dict[str, dict[str, Any]], wall: float) -> list[str]:
    """The total, the slowest tests and the per-marker table."""
    summed = sum(t["seconds"] for t in tests.values())
    lines = [f"wall {wall:.0f} s; tests' own time {summed:.0f} s over {len(tests)} tests"]
    lines.append(f"slowest {SLOWEST_SHOWN} (setup + call + teardown):")
    for nodeid, test in sorted(tests.items(), key=lambda kv: -kv[1]["seconds"])[:SLOWEST_SHOWN]:
        lines.append(f"  {test['seconds']:8.1f} s  {nodeid}")
    rows: dict[str, list[float]] = defaultdict(list)
    for test in tests.values():
        for name in test["markers"] or ["(none)"]:
            rows[name].append(test["seconds"])
    lines.append("per marker (a test counts under each of its markers):")
    lines.append(f"  {'marker':<12} {'tests':>6} {'seconds':>9} {'slowest':>9}")
    for name, times in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {name:<12} {len(times):>6} {sum(times):>9.0f} {max(times):>9.1f}")
    return lines


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the xdist controller, or a run without xdist, sums the reports
        config.pluginmanager.register(SuiteTimes(), "oellm-test-times")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    registered = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for item in items:
        if "tests/unit/" in item.nodeid:
            item.add_marker(pytest.mark.unit)
        # the markers themselves, not the keywords (which hold directory and test names too); user
        # properties travel with the reports from xdist workers to the controller
        names = {mark.name for mark in item.iter_markers()} & registered
        item.user_properties.extend((MARKER_PROPERTY, name) for name in sorted(names))


def main(paths: list[str]) -> None:
    """`python -m tests.timing A.json B.json`: one summary of several runs (CI's two passes)."""
    tests: dict[str, dict[str, Any]] = {}
    wall = 0.0
    for path in paths:
        run = json.loads(Path(path).read_text())
        tests.update(run["tests"])
        wall += run["wall_seconds"]
    print("\n".join(["where the time went, all passes:", *summary(tests, wall)]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
