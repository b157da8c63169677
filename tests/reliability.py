"""The `reliability` fixture: scenarios of the fault-injection suite (and the job-fault tests elsewhere)
report their figures; at the end of the session the rows are merged into
`benchmarks/results/reliability.json` (or $OELLM_RELIABILITY_OUT), from which
`scripts/reliability_report.py` regenerates the table in docs/reliability.md."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("OELLM_RELIABILITY_OUT", REPO / "benchmarks" / "results" / "reliability.json"))


class Reliability:
    """Rows of the reliability table: scenario -> what happened -> duplicate jobs, lost events, time to
    recover (None where the figure has no meaning for the scenario)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(
        self,
        scenario: str,
        happened: str,
        *,
        duplicates: int | None = None,
        lost_events: int | None = None,
        recover_seconds: float | None = None,
        **figures: Any,
    ) -> None:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        self.rows[scenario] = {
            "scenario": scenario,
            "happened": happened,
            "duplicates": duplicates,
            "lost_events": lost_events,
            "recover_seconds": None if recover_seconds is None else round(recover_seconds, 1),
            "figures": figures,
            "test": test,
            "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }


@pytest.fixture(scope="session")
def reliability() -> Iterator[Reliability]:
    table = Reliability()
    yield table
    if table.rows:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        # xdist workers end their sessions at about the same time: one merge at a time
        with open(RESULTS.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            previous.update(table.rows)
            RESULTS.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")
