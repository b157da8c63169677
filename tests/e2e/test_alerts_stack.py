"""A sweep's alerts through the shared production-like Airflow stack and the dev cluster: a training that runs
out of GPU memory fails for good, and the sweep finishes; a webhook receiver on 127.0.0.1 (in this test's
process) records what the Celery workers send it."""

from __future__ import annotations

import urllib.parse
import uuid

import pytest

from airflow_oellm.config import load_sweep
from tests.e2e.conftest import wait
from tests.shared_stack import add_file
from tests.webhook import Receiver

pytestmark = [pytest.mark.alerts]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def test_a_fatal_training_and_the_finished_sweep_reach_the_webhook(shared_stack, dev_cluster, module_remote_dir,
                                                                    slurm_conn_id, receiver):  # fmt: skip
    stack, token = shared_stack, uuid.uuid4().hex[:6]
    text = f"""
defaults: [{{platform: devcluster}}, _self_]
project: {{name: alert{token}, base_output_dir: {module_remote_dir}/alerts}}
platform: {{ssh_conn_id: {slurm_conn_id}}}
backend: {{name: command, launcher: none,
  command: [sh, -c, "echo 'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'; exit 1"]}}
monitoring: {{poll_interval_seconds: 2}}
restart: {{max_attempts: 2, retry_delay_seconds: 1}}
notifications:
  notify:
    - {{webhook: "{receiver.url}", events: [training_fatal, retries_exhausted, sweep_finished]}}
"""
    sweep = load_sweep(add_file(stack.sweeps, f"alert{token}.yaml", text))
    (e,) = sweep.experiments
    sweep_dag = f"oellm__{sweep.name}"
    wait(lambda: all(stack.http("GET", f"/dags/{d}") for d in (e.dag_id, sweep_dag)), 240, "the DAGs parsed", stack)
    run_id = stack.trigger(sweep_dag)
    assert stack.wait_run(sweep_dag, run_id, 600) == "failed", stack.explain(sweep_dag, run_id)
    wait(lambda: len(receiver.received) >= 2, 60, "both alerts received", stack, every=1)
    by_event = {r["alert"]["event"]: r for r in receiver.received}
    assert sorted(by_event) == ["sweep_finished", "training_fatal"], receiver.received  # fatal: no retry, no other
    fatal = by_event["training_fatal"]
    experiment_run = stack.xcom(sweep_dag, run_id, "run", "trigger_run_id", map_index=0)
    link = f"/oellm/experiments/{e.dag_id}?run_id={urllib.parse.quote(experiment_run, safe='')}"
    assert fatal["text"].startswith(f"[oellm] {sweep.name}/{e.name}: training failed: job "), fatal
    assert "CUDA out of memory" in fatal["text"] and fatal["text"].endswith(link), fatal
    finished = by_event["sweep_finished"]
    first_line, _, table = finished["text"].partition("\n")
    assert first_line == f"[oellm] {sweep.name}: sweep finished: failed 1 {stack.base.removesuffix('/api/v2')}" \
        f"/oellm/sweeps/{sweep.name}", finished  # fmt: skip
    assert table.startswith("```\n| experiment | state |") and f"| {e.name} | failed |" in table, table
