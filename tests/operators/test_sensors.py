"""CheckpointSensor and SlurmLogSensor with dag.test() on the real dev cluster (run after the training
here; tests/e2e runs them beside it through a real scheduler and triggerer)."""

from __future__ import annotations

import pytest
from airflow.sdk import DAG

from airflow_oellm.operators import SlurmSubmitOperator
from airflow_oellm.operators.submit import restart_policy
from airflow_oellm.sensors import CheckpointSensor, SlurmLogSensor
from tests.operators.conftest import start_date, unique_dag_id, xcom
from tests.operators.test_submit_operator import experiment, tis


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferred", "poke"])
def test_sensors_after_training(deferrable, write, backend, run_dag):
    exp = experiment(write, backend)
    ckpt = exp.paths.checkpoint_dir
    common = {**backend.conn, "poll_interval": 1, "deferrable": deferrable}
    beside = {"output_dir": exp.paths.output_dir, "training_task_id": "train"}
    with DAG(dag_id=unique_dag_id("sensors"), schedule=None, start_date=start_date(), catchup=False) as dag:
        train = SlurmSubmitOperator(
            task_id="train", **backend.conn, experiment=exp.resolved, **restart_policy(exp.resolved)
        )
        sensors = [
            CheckpointSensor(task_id="ckpt_20", checkpoint_dir=ckpt, iteration=20, **beside, **common),
            CheckpointSensor(task_id="ckpt_ge_15", checkpoint_dir=ckpt, iteration=15, at_least=True, **common),
            CheckpointSensor(
                task_id="ckpt_25_never", checkpoint_dir=ckpt, iteration=25, on_training_failure="skip", **common
            ),
            CheckpointSensor(
                task_id="ckpt_100_after_end",
                checkpoint_dir=ckpt,
                iteration=100,
                at_least=True,
                on_training_failure="skip",
                **beside,
                **common,
            ),
            SlurmLogSensor(task_id="loss_at_15", event="iteration", condition="iteration >= 15", **beside, **common),
            SlurmLogSensor(
                task_id="custom_event",
                event={
                    "name": "val",
                    "pattern": r"validation loss at iteration "
                    r"(?P<it>\d+) \| lm loss value: (?P<v>\S+)",
                    "extract_groups": {"value": "v"},
                },
                condition="it == 20",
                **beside,
                **common,
            ),
            SlurmLogSensor(task_id="never_happens", event="cuda_oom", **beside, **common),
        ]
        train >> sensors
    dr = run_dag(dag)
    states = {k: v.state for k, v in tis(dr).items()}
    assert states == {
        "train": "success",
        "ckpt_20": "success",
        "ckpt_ge_15": "success",
        "ckpt_25_never": "skipped",
        "ckpt_100_after_end": "skipped",
        "loss_at_15": "success",
        "custom_event": "success",
        "never_happens": "failed",
    }, states
    assert xcom(dr, "ckpt_20") == {"iteration": 20, "path": f"{ckpt}/iter_0000020", "format": "torch_dist"}
    assert xcom(dr, "ckpt_ge_15")["iteration"] == 20
    assert xcom(dr, "loss_at_15")["iteration"] == 15 and xcom(dr, "loss_at_15")["loss"] > 0
    assert xcom(dr, "custom_event")["value"] > 0
