"""An experiment DAG built by the factory, run with dag.test() on the dev cluster: prepare -> train ->
checkpoint branches (convert + evaluate with stand-in tools) -> a cooldown from the parent's checkpoint ->
report. And a bad run conf that must not reach SLURM.

The DAGs here are built with `dag.deferrable=false` (sensors in reschedule mode): dag.test() runs one task
at a time and a deferred task's trigger in line, so a checkpoint sensor deferred before the training that
writes its checkpoint can wait for ever (three tests did). The same factory DAGs run deferred, through a real scheduler
and triggerer, in tests/e2e/test_factory_stack.py and test_dashboard_stack.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_oellm.config import load_sweep
from airflow_oellm.config.budget import planned_gpu_hours
from airflow_oellm.dag_factory import experiment_dag
from tests.conftest import REPO
from tests.operators.conftest import xcom

FAKE_TOOLS = REPO / "tests" / "fixtures" / "fake_tools.py"
GOLD = REPO / "tests" / "fixtures" / "megatron" / "core-0.19.2" / "qwen3_gqa"
BYTE_TOKENIZER = REPO / "tests" / "fixtures" / "byte_tokenizer"
pytestmark = pytest.mark.factory


def small_study(backend, *extra: str):
    """The example study (config/sweeps/cooldowns_and_evals.yaml), made small and pointed at the backend."""
    tools = backend.provide(FAKE_TOOLS)
    where = (
        [f"platform.ssh_conn_id={backend.conn['cluster'].ssh_conn_id}"]
        if backend.batch_system == "slurm"
        else [f"platform={backend.platform}"]
    )
    return load_sweep(
        REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml",
        [
            f"project.base_output_dir={backend.work_dir}/runs",
            *where,
            "backend.python=python3",
            f"backend.entrypoint={backend.fake_megatron}",
            "backend.megatron_path=null",
            "backend.args.train_iters=20",
            "backend.args.save_interval=10",
            "++backend.args.eval_interval=10",
            "++backend.args.iter_seconds=0.1",
            "monitoring.poll_interval_seconds=2",
            "restart.max_attempts=2",
            "restart.retry_delay_seconds=1",
            f"conversion.command=[python3, {tools}, convert]",
            f"evaluation.command=[python3, {tools}, evaluate]",
            "evaluation.suites=[{name: quick}, {name: final_bench, when: final, tasks: [hellaswag]}]",
            "cooldowns=[{at: 10, overrides: [backend.args.lr=1.0e-5, backend.args.train_iters=25, "
            "+platform.env.FAKE_CRASH_AT=23]}]",
            "dag.deferrable=false",
            *extra,
        ],
    )


@pytest.fixture
def factory_sweep(backend):
    return small_study(backend)


def test_experiment_dag_runs_every_branch(backend, run_dag):
    # with checkpoint retention keeping the newest only: no branch may lose its checkpoint before it is done
    sweep = small_study(backend, "+retention={keep_last: 1}")
    exp = sweep.experiments[0]
    dag = experiment_dag(sweep, exp)
    dr = run_dag(dag)
    states = {}
    for ti in dr.get_task_instances():
        states.setdefault(ti.task_id, []).append(ti.state)
    assert dr.state == "success", states
    assert states["checkpoint.evaluate"] == ["success", "success"]  # iterations 10 and 20
    assert states["cooldown.train"] == ["success"] and states["cooldown.evaluate"] == ["success"]
    out = exp.paths.output_dir
    cooled = f"{out}_cooldown_10"
    # the cooldown loaded the parent's checkpoint 10, not its latest (20), into its own directory;
    # after a crash at 23 it resumed from its own checkpoint 20, not from the parent's again
    first, second = (
        backend.run(["cat", f"{cooled}/logs/{exp.name}_cooldown_10-{job}.out"])
        for job in xcom(dr, "cooldown.train", map_index=0)["job_ids"]
    )
    parent = exp.paths.checkpoint_dir
    assert f"successfully loaded checkpoint from {parent} [ t 1/1, p 1/1 ] at iteration 10" in first
    assert "learning rate: 1.000000E-05" in first and "simulated crash" in first
    assert f"successfully loaded checkpoint from {cooled}/checkpoints [ t 1/1, p 1/1 ] at iteration 20" in second
    assert "iteration       25/      25" in second
    assert backend.run(["cat", f"{cooled}/checkpoints/latest_checkpointed_iteration.txt"]) == "25"
    # every branch done, the report's last retention pass left the newest checkpoint of each training
    assert backend.run(["ls", parent]).split() == ["iter_0000020", "latest_checkpointed_iteration.txt"]
    assert backend.run(["ls", f"{cooled}/checkpoints"]).split() == ["iter_0000025", "latest_checkpointed_iteration.txt"]
    for path in (
        f"{out}/hf/iter_0000010/config.json",
        f"{out}/hf/iter_0000020/config.json",
        f"{cooled}/hf/iter_0000025/config.json",
        f"{out}/evaluations/iter_0000020/final_bench.json",
        f"{cooled}/evaluations/iter_0000025/final_bench.json",
        f"{out}/report/loss.png",
        f"{out}/provenance/resolved.json",
        f"{out}/provenance/unresolved.json",
    ):
        assert backend.succeeds(["test", "-s", path]), path
    # the benchmark suite runs on the final checkpoint only
    assert not backend.succeeds(["test", "-e", f"{out}/evaluations/iter_0000010/final_bench.json"])
    report = xcom(dr, "report")
    rows = {(r["run"], r["iteration"]): r for r in report["rows"]}
    assert set(rows) >= {(exp.name, 10), (exp.name, 20), (f"{exp.name}_cooldown_10", 25)}
    assert rows[(exp.name, 20)]["quick.perplexity"] > 0 and rows[(exp.name, 20)]["final_bench.perplexity"] > 0
    assert rows[(exp.name, 20)]["train_loss"] < rows[(exp.name, 10)]["train_loss"]
    assert rows[(exp.name, 10)]["validation_loss"] is not None
    # what the sweep analysis reads: N (the stand-in logs no count: the arguments', without embeddings), the
    # tokens of the trained iterations (the cooldown's continue its parent's at 10), the FLOPs, and which
    # losses are comparable: the training's last (its schedule decays) and the cooldown's last
    config = xcom(dr, "prepare", key="config")
    args = config["backend"]["args"]
    batch_tokens = args["global_batch_size"] * args["seq_length"]
    cooled_row = rows[(f"{exp.name}_cooldown_10", 25)]
    assert report["sweep"] == sweep.name and report["settings"] == {"lr": args["lr"], "global_batch_size": 256}
    assert report["parameters"]["from"] == "arguments without embeddings" and report["parameters"]["count"] > 1e7
    assert [rows[(exp.name, i)]["tokens"] for i in (10, 20)] == [10 * batch_tokens, 20 * batch_tokens]
    assert cooled_row["tokens"] == 25 * batch_tokens
    assert 6 * report["parameters"]["count"] * cooled_row["tokens"] < cooled_row["flops"]
    assert [rows[(exp.name, i)]["comparable"] for i in (10, 20)] == [None, "final"]
    assert cooled_row["comparable"] == "cooldown"
    # planned vs used GPU-hours: the plan prepare recorded, and SLURM's start-to-end of every job's attempts
    # (the dev cluster has no GPUs: both are 0, but every attempt was timed from sacct)
    assert report["gpu_hours"]["planned"] == planned_gpu_hours(config).as_record()
    assert set(report["gpu_hours"]["used"]) == {"training", "cooldowns", "side_jobs", "total"}
    attempts = xcom(dr, "train")["attempts"] + xcom(dr, "cooldown.train", map_index=0)["attempts"]
    assert attempts and all(isinstance(a["gpu_hours"], float) for a in attempts), attempts
    assert "GPU-hours used: 0 of 0 planned (training 0 of 0," in backend.run(["cat", f"{out}/report/report.md"])
    provenance = json.loads(backend.run(["cat", f"{out}/provenance/run.json"]))
    assert provenance["run_id"] == dr.run_id and provenance["overrides"] == []
    modes = backend.run(["stat", "-c", "%a", f"{out}/provenance/resolved.json", f"{out}/report/report.md"]).split()
    assert modes == ["600", "600"]


def test_bad_conf_is_rejected_before_anything_reaches_slurm(factory_sweep, backend, run_dag):
    sweep = factory_sweep
    exp = sweep.experiments[0]
    for conf in (
        {"backend.args.train_iters": "lots"},
        {"overrides": ["backend.args.lrr=0.1"]},
        {"overrides": ["project.base_output_dir=/elsewhere"]},
        {"not_a_param": 1},
        {"overrides": ["slurm.partition=x; touch /tmp/PWNED"]},
    ):
        try:
            dr = run_dag(experiment_dag(sweep, exp), conf)
        except Exception as exc:  # Airflow may refuse the conf when it creates the run (typed Params)
            assert "train_iters" in str(exc) or "lots" in str(exc), exc
            continue
        states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
        assert dr.state == "failed" and states["prepare"] == "failed", (conf, states)
        assert states["train"] in ("upstream_failed", None), (conf, states)
    scripts = backend.run(["squeue", "-h", "--me", "-t", "all", "-o", "%o"]).split()
    assert [s for s in scripts if s.startswith(exp.paths.output_dir)] == []
    assert not backend.succeeds(["test", "-e", f"{exp.paths.output_dir}/scripts"])


@pytest.mark.convert
def test_checkpoint_branch_converts_and_evaluates_for_real(
    dev_cluster, remote_dir, fake_megatron, slurm_conn_id, run_dag, cluster_tools
):
    """The checkpoint branch with the real `airflow-oellm convert` / `evaluate` as SLURM jobs: the trainer
    saves a real megatron-core checkpoint (a gold fixture, with the training tokenizer beside it)."""
    template = f"{remote_dir}/megatron_iter"
    dev_cluster.ssh(["cp", "-r", str(GOLD / "torch_dist" / "iter_0000100"), template])
    dev_cluster.ssh(["cp", "-r", str(BYTE_TOKENIZER), f"{template}/tokenizer"])
    sweep = load_sweep(
        REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml",
        [
            f"project.base_output_dir={remote_dir}/runs",
            f"platform.ssh_conn_id={slurm_conn_id}",
            "backend.python=python3",
            f"backend.entrypoint={fake_megatron}",
            "backend.megatron_path=null",
            "backend.args.train_iters=10",
            "backend.args.save_interval=10",
            "++backend.args.iter_seconds=0.1",
            f"+platform.env.FAKE_CHECKPOINT_FROM={template}",
            "monitoring.poll_interval_seconds=2",
            f"conversion.command=[{cluster_tools}, convert]",
            f"evaluation.command=[{cluster_tools}, evaluate]",
            "evaluation.suites=[{name: quick, tasks: [perplexity], args: [--window, '32']}]",
            "cooldowns=[]",
            "dag.deferrable=false",
        ],
    )
    exp = sweep.experiments[0]
    dr = run_dag(experiment_dag(sweep, exp))
    states = {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success", states
    out = exp.paths.output_dir
    hf = Path(out) / "hf" / "iter_0000010"  # the dev cluster's filesystem is this machine's
    assert json.loads((hf / "conversion.json").read_text())["iteration"] == 10
    assert (hf / "tokenizer.json").exists()  # copied from the checkpoint's tokenizer/
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf)
    ids = AutoTokenizer.from_pretrained(hf)("checkpoint", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 384)
    result = json.loads(dev_cluster.ssh(["cat", f"{out}/evaluations/iter_0000010/quick.json"]).stdout)
    assert result["iteration"] == 10 and result["tasks"] == ["perplexity"]
    assert result["model"]["architecture"] == "Qwen3ForCausalLM" and result["metrics"]["perplexity"] > 1
    rows = {r["iteration"]: r for r in xcom(dr, "report")["rows"]}
    assert rows[10]["quick.perplexity"] == result["metrics"]["perplexity"]


@pytest.mark.slow
@pytest.mark.convert
@pytest.mark.demo
def test_tiny_trainer_study_trains_converts_evaluates_and_cools_down(
    dev_cluster, remote_dir, slurm_conn_id, run_dag, cluster_tools, write
):
    """A study with the tiny trainer that really trains, and the real converter and evaluator:
    losses fall across checkpoints, and the cooldown ends below its parent at the same iteration."""
    path = write(
        "config/sweeps/tiny_study.yaml",
        f"""
        defaults: [{{platform: devcluster}}, {{model: tiny}}, _self_]
        project: {{name: tiny_study, base_output_dir: {remote_dir}/runs}}
        platform: {{ssh_conn_id: {slurm_conn_id}}}
        backend:
          python: {cluster_tools.with_name("python")}
          megatron_path: {REPO / "examples" / "tiny_megatron"}
          args:
            train_iters: 200
            save_interval: 70
            eval_interval: 70
            eval_iters: 16
            lr: 1.0e-2
            min_lr: 1.0e-5
            lr_decay_style: WSD    # the parent stays at its peak rate ...
            lr_wsd_decay_iters: 1
            lr_warmup_iters: 0
        monitoring: {{poll_interval_seconds: 2}}
        conversion: {{command: [{cluster_tools}, convert]}}
        evaluation:
          command: [{cluster_tools}, evaluate]
          suites: [{{name: quick, tasks: [perplexity]}}]
        cooldowns:             # ... the cooldown decays over its last 60 iterations
          - {{at: 140, overrides: [backend.args.lr_wsd_decay_iters=60]}}
        dag: {{deferrable: false}}
        """,
    )
    sweep = load_sweep(path)
    exp = sweep.experiments[0]
    dr = run_dag(experiment_dag(sweep, exp))
    states = {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success", states
    rows = {(r["run"], r["iteration"]): r for r in xcom(dr, "report")["rows"]}
    parent = [rows[(exp.name, i)] for i in (70, 140, 200)]
    assert parent[0]["train_loss"] > parent[1]["train_loss"] > parent[2]["train_loss"]
    assert all(r["quick.perplexity"] > 1 for r in parent)
    cooled = rows[(f"{exp.name}_cooldown_140", 200)]
    assert cooled["validation_loss"] < parent[2]["validation_loss"], (cooled, parent[2])
    # polled from the worker: the worker keeps the progress XCom; evaluations return their metrics
    assert 1 <= xcom(dr, "train", key="progress")["summary"]["last_iteration"] <= 200
    assert xcom(dr, "checkpoint.evaluate", map_index=0)["metrics"]["quick"]["perplexity"] > 1
    hf = Path(exp.paths.output_dir) / "hf" / "iter_0000200"  # the dev cluster's filesystem is this machine's
    assert (hf / "tokenizer.json").exists() and json.loads((hf / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.faults
def test_a_cooldown_whose_parent_fails_first_ends_at_once(backend, run_dag, reliability):
    """The parent runs out of memory at iteration 5 (fatal), before its checkpoint 10: the cooldown from
    checkpoint 10, and the checkpoint branches, stop waiting and say why instead of waiting for ever."""
    sweep = small_study(backend, "+platform.env.FAKE_OOM_AT=5")
    exp = sweep.experiments[0]
    dr = run_dag(experiment_dag(sweep, exp))
    tis = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
    train = tis[("train", -1)]
    assert dr.state == "failed" and train.state == "failed" and train.try_number == 1
    waits = [ti for (task, _), ti in tis.items() if task in ("cooldown.wait", "checkpoint.wait")]
    assert waits and all(ti.state == "skipped" for ti in waits), {k: t.state for k, t in tis.items()}
    assert all(tis[k].state == "skipped" for k in tis if k[0] in ("cooldown.train", "checkpoint.convert"))
    late = max((ti.end_date - train.end_date).total_seconds() for ti in waits)
    assert late < 60, late  # within a few poll intervals (2 s here) and the settle hold, not a timeout
    status = json.loads(backend.run(["cat", f"{exp.paths.output_dir}/.oellm/status/train.json"]))
    assert status["state"] == "failed" and "out of memory" in status["reason"]
    reliability.record(
        f"cooldown whose parent fails first ({backend.batch_system})",
        "the parent failed for good at iteration 5; the cooldown and checkpoint waits were skipped, "
        "naming the failed training",
        recover_seconds=late,
    )
