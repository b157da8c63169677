"""The README's `airflow` commands, exactly as written, against a real Airflow stack with the project's
DAG file and example sweeps. The SSH connection points at a port nothing listens on, so the runs they
create fail in `prepare` and no job is ever submitted: what is checked is what the commands create."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import free_port, sweeps_dag_file, wait

pytestmark = pytest.mark.factory

TRIGGERED = "oellm__minimal__minimal_lr0.0003"
BACKFILLED = "oellm__nightly_speed__speed_mbs1"


def readme_airflow_lines() -> list[str]:
    return [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("airflow ")]


@pytest.fixture(scope="module")
def stack(stack_factory):
    nowhere = json.dumps({"conn_type": "ssh", "host": "127.0.0.1", "port": free_port(), "login": "nobody"})
    s = stack_factory(
        sweeps_dag_file, {"OELLM_SWEEPS_PATH": str(REPO / "config" / "sweeps"), "AIRFLOW_CONN_SLURM_DEV": nowhere}
    )
    wait(lambda: all(s.http("GET", f"/dags/{d}") for d in (TRIGGERED, BACKFILLED)), 300, "example DAGs parsed", s)
    return s


def test_the_readme_airflow_commands_create_their_runs(stack):
    lines = readme_airflow_lines()
    assert [line.split()[:3] for line in lines] == [["airflow", "dags", "trigger"], ["airflow", "backfill", "create"]]
    for line in lines:
        stack.cli(*shlex.split(line)[1:])
    manual = [r for r in stack.runs(TRIGGERED) if r["run_type"] == "manual"]
    assert len(manual) == 1 and manual[0]["conf"] == {"backend.args.train_iters": 500}

    backfills = stack.http("GET", f"/backfills?dag_id={BACKFILLED}")["backfills"]
    assert len(backfills) == 1
    assert (backfills[0]["from_date"][:10], backfills[0]["to_date"][:10]) == ("2026-11-20", "2026-11-21")

    def first_backfill_run() -> list[str]:  # max_active_runs=1: the next run is created when this one ends
        return [r["logical_date"][:10] for r in stack.runs(BACKFILLED) if r["run_type"] == "backfill"]

    assert wait(first_backfill_run, 120, "the backfill's first run", stack)[0] == "2026-11-20"
