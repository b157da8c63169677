"""Fault injection: every test here is marked `faults` (run them alone with `-m faults`). Figures go to
the `reliability` fixture (tests/reliability.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.faults)
