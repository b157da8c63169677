"""`plan_run`: one DAG run decided without Airflow (what `prepare` calls)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from airflow_oellm.config import ConfigError
from airflow_oellm.config.run import RunRequest, plan_run
from tests.conftest import CONFIG

pytestmark = pytest.mark.config

SWEEP = str(CONFIG / "sweeps" / "cooldowns_and_evals.yaml")
WHEN = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)


def test_a_run_with_overrides_cooldown_points_and_its_plan():
    run = plan_run(
        RunRequest(
            SWEEP, "lr0.001", WHEN, overrides=["backend.args.train_iters=120000"], cooldown_points=[50000, 75000]
        )
    )
    assert run.config["backend"]["args"]["train_iters"] == 120000
    assert [c["at"] for c in run.milestones.cooldowns] == [50000, 75000]  # 75000 copies the first training one
    assert run.overrides == ["backend.args.train_iters=120000", "cooldowns.at=[50000, 75000]"]
    assert run.when == WHEN and run.experiment.name == "lr0.001"
    assert run.planned.as_record()["total"] == 0.0  # the local platform has no GPUs


def test_a_scheduled_interval_gets_its_own_directory():
    run = plan_run(RunRequest(SWEEP, "lr0.001", WHEN, scheduled_stamp="20261201T000000"))
    assert run.config["experiment"]["output_dir"].endswith("/cooldowns/runs/20261201T000000/lr0.001")


def test_what_a_run_cannot_do_is_refused_together():
    with pytest.raises(ConfigError) as err:
        plan_run(RunRequest(SWEEP, "lr0.001", WHEN, overrides=["+vars.x=1"], cooldown_branch=False))
    assert [i.key for i in err.value.issues] == ["vars.x", "cooldowns"]
