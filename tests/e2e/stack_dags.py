"""DAG file for the end-to-end tests (copied into the stack's DAG folder; every JSON file beside it is a
spec, {"dags": [...]}, one per module that shares the stack).

Kinds: `train` (one SlurmSubmitOperator), `train_with_sensors` (train and, beside it, a CheckpointSensor
and a SlurmLogSensor), `fanout` (one mapped SlurmSubmitOperator over many experiments) and `settle_probe`
(`tasks` deferrals whose trigger fires at once, held `hold` seconds or by the setting if null, the
worker lingering `linger` seconds; needs settle_probe.py on the path), `reconcile` (the factory's
`oellm_reconcile` over the spec's `dag_ids` on `conn_id`). Optional: `retries`, `retry_delay`
(seconds) and `secret_variables` (train), `max_active_runs`.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, get_parsing_context

from airflow_oellm.dag_factory import reconcile_dag
from airflow_oellm.operators import SlurmSubmitOperator
from airflow_oellm.sensors import CheckpointSensor, SlurmLogSensor
from airflow_oellm.slurm.target import ClusterTarget

SPECS = [spec for path in sorted(Path(__file__).parent.glob("*.json")) for spec in json.loads(path.read_text())["dags"]]
# a task's process builds its own DAG only (the scale benchmark's folder holds hundreds)
WANTED = get_parsing_context().dag_id

for spec in SPECS:
    if WANTED is not None and spec["dag_id"] != WANTED:
        continue
    if spec["kind"] == "reconcile":
        globals()["oellm_reconcile"] = reconcile_dag({ClusterTarget(spec["conn_id"]): spec["dag_ids"]})
        continue
    with DAG(
        dag_id=spec["dag_id"],
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_tasks=128,
        max_active_runs=spec.get("max_active_runs", 1),
    ) as dag:
        conn = spec.get("conn_id")
        if spec["kind"] == "settle_probe":
            from settle_probe import DeferAtOnce

            for i in range(spec["tasks"]):
                DeferAtOnce(task_id=f"defer_{i}", hold=spec["hold"], linger=spec["linger"], retries=0)
        elif spec["kind"] == "train":
            SlurmSubmitOperator(
                task_id="train",
                ssh_conn_id=conn,
                experiment=spec["experiment"],
                retries=spec.get("retries", 0),
                retry_delay=timedelta(seconds=spec.get("retry_delay", 2)),
                secret_variables=spec.get("secret_variables", {}),
            )
        elif spec["kind"] == "fanout":
            SlurmSubmitOperator.partial(task_id="train", ssh_conn_id=conn, retries=0).expand(
                experiment=spec["experiments"]
            )
        else:
            exp = spec["experiment"]
            SlurmSubmitOperator(
                task_id="train", ssh_conn_id=conn, experiment=exp, retries=2, retry_delay=timedelta(seconds=2)
            )
            beside = {
                "output_dir": exp["experiment"]["output_dir"],
                "training_task_id": "train",
                "ssh_conn_id": conn,
                "poll_interval": 2,
            }
            CheckpointSensor(
                task_id="checkpoint",
                checkpoint_dir=exp["experiment"]["checkpoint_dir"],
                iteration=spec["checkpoint"],
                **beside,
            )
            SlurmLogSensor(
                task_id="progress", event="iteration", condition=f"iteration >= {spec['checkpoint']}", **beside
            )
    globals()[spec["dag_id"]] = dag
