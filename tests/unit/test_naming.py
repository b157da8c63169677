"""naming.py owns every id both ways: DAG ids, tags and task ids are built and parsed back in one place."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.config import naming
from airflow_oellm.config.naming import (
    CONFIG_ERRORS_DAG_ID,
    DagIdParts,
    dag_id,
    experiment_name,
    parse_dag_id,
    parse_sweep_tag,
    run_part_task,
    sweep_dag_id,
    sweep_tag,
)

pytestmark = pytest.mark.config
# what check_name lets through: `__` may appear inside an experiment name
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,30}", fullmatch=True)
SWEEPS = NAMES.filter(lambda name: "__" not in name and not name.endswith("_"))


@given(SWEEPS, NAMES)
def test_an_experiment_dag_id_parses_back(sweep, name):
    assert parse_dag_id(dag_id(sweep, name)) == DagIdParts(sweep, name)
    assert experiment_name(dag_id(sweep, name), sweep) == name


@given(SWEEPS)
def test_a_sweep_dag_id_parses_back(sweep):
    assert parse_dag_id(sweep_dag_id(sweep)) == DagIdParts(sweep, None)
    assert parse_sweep_tag(sweep_tag(sweep)) == sweep


def test_ids_that_are_not_ours():
    for foreign in ("etl_daily", "oellm", "oellm__", "other__s__e", "oellmx__s__e"):
        assert parse_dag_id(foreign) is None, foreign
    assert experiment_name("etl_daily", "s") == "etl_daily"
    assert experiment_name(dag_id("other", "e"), "s") == dag_id("other", "e")
    assert parse_sweep_tag("platform:lumi") is None and parse_sweep_tag("sweep") is None


def test_the_wire_values_stay():
    """DAG ids, tags and task ids are stored in deployed databases and on the cluster."""
    assert dag_id("s", "lr1e-4__b") == "oellm__s__lr1e-4__b"
    assert sweep_dag_id("s") == "oellm__s" and CONFIG_ERRORS_DAG_ID == "oellm__config_errors"
    assert sweep_tag("s") == "sweep:s"
    assert run_part_task(1, 1) == "run" and run_part_task(2, 3) == "run_2"
    keys = (naming.RETURN_KEY, naming.RESULT_KEY, naming.PROGRESS_KEY, naming.CONFIG_KEY, naming.COOLDOWNS_KEY)
    assert keys == ("return_value", "result", "progress", "config", "cooldowns")
    assert naming.HISTORY_KEY == "oellm_attempts"


def test_the_loader_and_the_planner_lay_out_outputs_alike():
    """One layout: an experiment's resolved paths, and a cooldown's, are naming.job_paths of its name."""
    from airflow_oellm.config import load_sweep
    from airflow_oellm.config.milestones import job_config
    from airflow_oellm.config.naming import job_paths
    from tests.conftest import REPO

    exp = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    section = exp.resolved["experiment"]
    assert {k: section[k] for k in job_paths("x", "/o")} == job_paths(exp.name, section["output_dir"])
    cooled = job_config(exp.runtime_config(), {"kind": "cooldown", "cooldown": 0})["experiment"]
    assert {k: cooled[k] for k in job_paths("x", "/o")} == job_paths(cooled["name"], cooled["output_dir"])
    assert cooled["output_dir"] != section["output_dir"]
