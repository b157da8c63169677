"""A scaling ladder on the dev cluster, through the shared production-like Airflow stack: the tiny trainer at
three sizes and two learning rates, cooldowns at three lengths, and a rung at iteration 40 that stops the worse
rate of each size (`sweep.early_stop`). Then the sweep's analysis: a fit of L(N, D) over the three sizes, the
best rate per size as the runs show it, and the stopped points marked, with the hours they did not spend. Last,
a stopped point cleared by a user trains on to its end."""

from __future__ import annotations

import json
import uuid

import pytest

from airflow_oellm.config import load_sweep
from tests.conftest import REPO
from tests.e2e.conftest import wait
from tests.shared_stack import add_file
from tests.webhook import Receiver

pytestmark = [pytest.mark.early_stop, pytest.mark.analysis, pytest.mark.demo]
RATES = (3.0e-3, 3.0e-2)
SIZES = ("tiny", "tiny-wide", "tiny-large")
RUNG = 40


def sweep_yaml(remote: str, token: str, conn_id: str, python: str, hook: str) -> str:
    return f"""
defaults: [{{platform: devcluster}}, {{model: tiny}}, _self_]
project: {{name: ladder{token}, base_output_dir: {remote}/runs}}
platform: {{ssh_conn_id: {conn_id}}}
backend:
  python: {python}
  megatron_path: {REPO / "examples" / "tiny_megatron"}
  # 0.4 s an iteration at least: the rung's decision reaches the worse point well before its end at 100
  args: {{train_iters: 100, save_interval: 20, eval_interval: 20, eval_iters: 8, min_lr: 1.0e-5, iter_seconds: 0.4,
          lr_decay_style: WSD, lr_wsd_decay_iters: 1, lr_warmup_iters: 0}}
monitoring: {{poll_interval_seconds: 2}}
restart: {{max_attempts: 2, retry_delay_seconds: 1}}
conversion: {{enabled: false}}
# each decays the rate over 20 iterations from its checkpoint: three token counts for the fit
cooldowns:
  - {{at: 20, overrides: [backend.args.train_iters=40, backend.args.lr_wsd_decay_iters=20]}}
  - {{at: 40, overrides: [backend.args.train_iters=60, backend.args.lr_wsd_decay_iters=20]}}
  - {{at: 80, overrides: [backend.args.train_iters=100, backend.args.lr_wsd_decay_iters=20]}}
sweep:
  name: ladder{token}
  name_template: "{{model}}_lr{{lr}}"
  axes:
    model: [{", ".join(SIZES)}]
    backend.args.lr: [{", ".join(map(str, RATES))}]
  early_stop: {{at: [{RUNG}], within: model, keep: 0.5}}
notifications: {{notify: [{{webhook: "{hook}", events: [early_stop, sweep_finished]}}]}}
"""


@pytest.fixture(scope="module")
def receiver():
    """The sweep's webhook: hears of each point stopped and of the sweep's end."""
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def stack(shared_stack, dev_cluster, module_remote_dir, slurm_conn_id, cluster_tools, receiver):
    token = uuid.uuid4().hex[:6]
    s = shared_stack
    text = sweep_yaml(module_remote_dir, token, slurm_conn_id, str(cluster_tools.with_name("python")), receiver.url)
    s.sweep = load_sweep(add_file(s.sweeps, f"ladder{token}.yaml", text))
    ids = [e.dag_id for e in s.sweep.experiments] + [f"oellm__{s.sweep.name}"]
    wait(lambda: all(s.http("GET", f"/dags/{d}") for d in ids), 240, "the sweep's DAGs parsed", s)
    return s


@pytest.fixture(scope="module")
def ladder(stack, dev_cluster):
    """The sweep's run, finished (a fixture: the test's own time limit covers its checks, not the training).

    The higher rate of each size starts once the lower has passed the rung (its DAG is paused until then), so
    that it is ranked as it reaches the rung, with 60 iterations to go. Started together, the stack's workers
    had started one point a minute after its sibling, which then finished while the rung waited."""
    sweep_dag = f"oellm__{stack.sweep.name}"
    by_name = {e.name: e for e in stack.sweep.experiments}
    # the later point's DAG id -> the tracker of the first point's checkpoints
    held = {
        by_name[f"{size}_lr{RATES[1]}"].dag_id:
            f"{by_name[f'{size}_lr{RATES[0]}'].paths.checkpoint_dir}/latest_checkpointed_iteration.txt"
        for size in SIZES
    }  # fmt: skip
    for dag_id in held:
        stack.http("PATCH", f"/dags/{dag_id}", {"is_paused": True})
    run_id = stack.trigger(sweep_dag)

    def release() -> bool:
        for dag_id, tracker in list(held.items()):
            saved = dev_cluster.ssh(["cat", tracker], check=False).stdout.strip()
            if saved.isdigit() and int(saved) >= RUNG:
                stack.http("PATCH", f"/dags/{dag_id}", {"is_paused": False})
                del held[dag_id]
        return not held

    wait(release, 600, "each size's lower rate past the rung", stack, every=2)
    assert stack.wait_run(sweep_dag, run_id, 1500) == "success", stack.explain(sweep_dag, run_id)
    return sweep_dag, run_id


def test_a_ladder_stops_the_worse_rate_at_the_rung_and_its_analysis_fits_the_three_sizes(
    stack, ladder, dev_cluster, receiver
):
    sweep = stack.sweep
    sweep_dag, run_id = ladder
    early = stack.xcom(sweep_dag, run_id, "early_stop")
    summary = {r["experiment"]: r for r in stack.xcom(sweep_dag, run_id, "summary")["rows"]}
    analysis = stack.xcom(sweep_dag, run_id, "analysis")

    # from the runs themselves: each point's validation loss at the rung, its cooldowns' final losses
    at_rung, stopped, cooled = {}, {}, {}
    for index, e in enumerate(sweep.experiments):
        experiment_run = stack.xcom(sweep_dag, run_id, "run", "trigger_run_id", map_index=index)
        train = {t["task_id"]: t for t in stack.task_instances(e.dag_id, experiment_run)}["train"]
        skipped = train["state"] == "skipped"
        result = stack.xcom(e.dag_id, experiment_run, "train", "result" if skipped else "return_value")
        points = [p for a in result["attempts"] for p in a["validation"]] + result["summary"]["validation"]
        at_rung[e.name] = next(p["loss"] for p in points if p["iteration"] == RUNG)
        report = stack.xcom(e.dag_id, experiment_run, "report")
        if skipped:
            stopped[e.name] = result["classification"]["reason"]
            assert report["stopped_early"] == stopped[e.name] and result["last_iteration"] < 100, result
        for row in report["rows"]:
            if row["comparable"] == "cooldown":
                cooled.setdefault((f"{row['parameters']:.4g}", row["tokens"]), {})[e.parameters["backend.args.lr"]] = (
                    row["validation_loss"]
                )
    # the rung stopped the worse rate of each size, and only it: ranked 2nd of 2, skipped, never failed
    for size in SIZES:
        losses = {lr: at_rung[f"{size}_lr{lr}"] for lr in RATES}
        worse = f"{size}_lr{max(RATES, key=losses.__getitem__)}"
        assert stopped.get(worse, "").startswith(f"stopped early: rank 2/2 at {RUNG} (loss "), (stopped, losses)
    assert len(stopped) == len(SIZES) and early["stopped"] == stopped and early["too_late"] == {}, (stopped, early)
    assert all(summary[name]["state"] == "stopped early" for name in stopped), summary
    # the webhook heard of each point stopped, with its reason, and of the sweep's end
    alerts = [r["alert"] for r in receiver.received]
    assert {a["experiment"]: a["reason"] for a in alerts if a["event"] == "early_stop"} == stopped, alerts
    assert [a["event"] for a in alerts].count("sweep_finished") == 1, alerts
    saved = early["saved"]
    assert 0 < saved["hours"] < saved["sweep_hours"] and saved["gpu_hours"] == 0, saved  # the dev cluster: no GPUs
    # the analysis: the cooldowns' validation losses at three token counts, a law over the three sizes, and each
    # size's best rate where both rates have a cooldown, as the reports show it
    assert analysis["losses_used"] == ["cooldown"] and analysis["loss"] == "validation_loss"
    assert set(analysis["loss_law"]["parameters"]) == {"E", "A", "B", "alpha", "beta"}, analysis["loss_law"]
    assert len({m["parameters"] for m in analysis["measurements"]}) == 3
    assert len({m["tokens"] for m in analysis["measurements"]}) == 3
    assert len(analysis["best"]["lr"]) == 3
    for size, row in analysis["best"]["lr"].items():
        losses = cooled[(size, row["tokens"])]
        assert len(losses) == 2 and row["value"] == min(losses, key=losses.__getitem__), (row, losses)
    files = dev_cluster.ssh(["ls", analysis["output"]]).stdout.split()
    assert {"analysis.json", "analysis.md", "loss_law.png", "loss_vs_compute.svg", "early_stop.json"} <= set(files)


def test_a_stopped_point_cleared_by_a_user_trains_on_to_its_end(stack, ladder, dev_cluster):
    """Clearing its training (and what follows it) resumes it from its latest checkpoint to the end; its stop
    request is marked resumed, and nothing stops it again."""
    sweep = stack.sweep
    sweep_dag, run_id = ladder
    stopped = stack.xcom(sweep_dag, run_id, "early_stop")["stopped"]
    name = next(iter(stopped))
    index, e = next((i, e) for i, e in enumerate(sweep.experiments) if e.name == name)
    experiment_run = stack.xcom(sweep_dag, run_id, "run", "trigger_run_id", map_index=index)
    clear = {"dry_run": False, "only_failed": False, "task_ids": ["train"], "dag_run_id": experiment_run,
             "include_downstream": True, "reset_dag_runs": True}  # fmt: skip
    stack.http("POST", f"/dags/{e.dag_id}/clearTaskInstances", clear)

    def second_try() -> bool:
        train = {t["task_id"]: t for t in stack.task_instances(e.dag_id, experiment_run)}["train"]
        return train["try_number"] >= 2 and train["state"] not in (None, "skipped")

    wait(second_try, 120, "the cleared training's next try", stack, every=2)
    assert stack.wait_run(e.dag_id, experiment_run, 600) == "success", stack.explain(e.dag_id, experiment_run)
    result = stack.xcom(e.dag_id, experiment_run, "train")
    assert [a["verdict"] for a in result["attempts"]] == ["stopped", "success"], result["attempts"]
    assert result["last_iteration"] == 100 and result["summary"]["resumed_from"] >= 20, result["summary"]
    request = json.loads(dev_cluster.ssh(["cat", f"{e.paths.output_dir}/.oellm/early_stop.json"]).stdout)
    assert request["resumed"] is True and request["reason"] == stopped[name]
