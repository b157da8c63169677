"""The suite's time budget (docs/dev-cluster.md, "Testing: where the time goes"): no test may be declared
with a timeout above five minutes, and no test waits on a clock without saying why."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests.timing import MAX_TEST_TIMEOUT_SECONDS

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def declared_timeouts(repo: Path = REPO) -> list[tuple[str, float]]:
    """Every `pytest.mark.timeout(N)` under tests/ and the default in pyproject.toml."""
    ini = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    found = [("pyproject.toml [tool.pytest.ini_options] timeout", float(ini["timeout"]))]
    for path in sorted((repo / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "timeout"
                and ast.unparse(node.func.value).endswith("mark")
            ):
                value = node.args[0] if node.args else next(k.value for k in node.keywords if k.arg == "timeout")
                found.append((f"{path.relative_to(repo)}:{node.lineno}", float(ast.literal_eval(value))))
    return found


def test_no_test_is_declared_with_a_timeout_above_five_minutes():
    timeouts = declared_timeouts()
    assert timeouts[0][1] > 0, "the default timeout must be on: a hung test would eat the whole CI"
    over = [(where, seconds) for where, seconds in timeouts if seconds > MAX_TEST_TIMEOUT_SECONDS]
    assert not over, f"timeouts above {MAX_TEST_TIMEOUT_SECONDS} s: {over}"


def test_the_timeout_scan_finds_a_marker_in_every_form(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntimeout = 120\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text(
        "import pytest\n@pytest.mark.timeout(600)\ndef test_a(): pass\npytestmark = pytest.mark.timeout(timeout=30)\n"
    )
    assert declared_timeouts(tmp_path) == [
        ("pyproject.toml [tool.pytest.ini_options] timeout", 120.0),
        ("tests/test_x.py:2", 600.0),
        ("tests/test_x.py:4", 30.0),
    ]


def unexplained_sleeps(root: Path) -> list[str]:
    """Sleeps with no comment on their line or the line above: every wait on a clock says why
    (`# poll` in a loop that re-checks a condition; otherwise what the time is for)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "sleep"
                and ast.unparse(node.func.value) in ("time", "asyncio")
            ):
                line = lines[node.lineno - 1]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                if "#" not in line[node.col_offset :] and not above.startswith("#"):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {line.strip()}")
    return sorted(found)


def test_every_sleep_in_the_tests_says_why():
    assert unexplained_sleeps(TESTS) == []


def test_the_sleep_scan_finds_a_bare_sleep(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "a.py").write_text(
        "time.sleep(1)  # poll\n# the outage\ntime.sleep(6)\nasync def f():\n    await asyncio.sleep(2)\n"
    )
    assert unexplained_sleeps(tests) == ["tests/a.py:5: await asyncio.sleep(2)"]
