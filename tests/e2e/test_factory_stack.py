"""The DAG factory through a real Airflow stack: the project's DAG file loading sweeps from
$OELLM_SWEEPS_PATH, runs triggered from the CLI with `--conf` and through the REST API, a bad conf
that never reaches SLURM, a sweep DAG running its experiments, and a backfill of a scheduled sweep.
The stack is the production topology: PostgreSQL, Celery, two schedulers, triggerers and workers."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import uuid
from pathlib import Path

import pytest

from airflow_oellm.config import load_sweep
from tests.e2e.conftest import upload_fake_tools, wait
from tests.shared_stack import add_file, stack_secrets

pytestmark = pytest.mark.factory


def write_sweeps(directory: Path, remote: str, token: str, conn_id: str) -> dict[str, Path]:
    backend = (
        f"platform: {{ssh_conn_id: {conn_id}}}\n"
        f"backend: {{python: python3, entrypoint: {remote}/fake_megatron.py, megatron_path: null,\n"
        "  args: {train_iters: 20, save_interval: 10, eval_interval: 10, iter_seconds: 0.2}}\n"
        "monitoring: {poll_interval_seconds: 2}\n"
        "restart: {max_attempts: 2, retry_delay_seconds: 1}\n"
    )
    tools = f"[python3, {remote}/fake_tools.py"
    files = {
        "study": f"""
defaults: [{{platform: devcluster}}]
project: {{name: fx{token}, base_output_dir: {remote}/runs}}
{backend}
conversion: {{command: {tools}, convert]}}
evaluation:
  command: {tools}, evaluate]
  suites: [{{name: quick}}, {{name: final_bench, when: final, tasks: [hellaswag]}}]
cooldowns: [{{at: 10, overrides: [backend.args.lr=1.0e-5, backend.args.train_iters=15]}}]
sweep: {{name: fx{token}, name_template: "{{stage}}", axes: {{stage: [cli, rest, bad]}},
  base_values: {{platform.env.OELLM_STAGE: "${{vars.stage}}"}}}}
""",
        "secret": f"""
defaults: [{{platform: devcluster}}]
project: {{name: secret{token}, base_output_dir: {remote}/runs}}
{backend.replace(f"platform: {{ssh_conn_id: {conn_id}}}", "")}
conversion: {{enabled: false}}
evaluation: {{enabled: false}}
platform:
  ssh_conn_id: {conn_id}
  secrets: {{OELLM_TOKEN: "var:oellm_e2e_token", OELLM_PASSWORD: "conn:oellm_e2e_secret/password"}}
  env: {{FAKE_DIGEST_OF: "OELLM_TOKEN,OELLM_PASSWORD"}}
""",
        "nightly": f"""
defaults: [{{platform: devcluster}}]
project: {{name: nightly{token}, base_output_dir: {remote}/runs}}
{backend}
conversion: {{enabled: false}}
evaluation: {{enabled: false}}
dag: {{schedule: "@daily", start_date: "2026-11-01"}}
sweep: {{name: nightly{token}, name_template: "speed{{i}}", axes: {{i: [1, 2]}},
  base_values: {{platform.env.OELLM_SPEED: "${{vars.i}}"}}}}
""",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = add_file(directory, f"{name}{token}.yaml", text)
    return paths


@pytest.fixture(scope="module")
def stack(shared_stack, dev_cluster, module_remote_dir, slurm_conn_id):
    remote = module_remote_dir
    upload_fake_tools(dev_cluster, remote)
    token = uuid.uuid4().hex[:6]
    s = shared_stack  # the project's DAG file, loading the sweeps in s.sweeps (tests/shared_stack.py)
    paths = write_sweeps(s.sweeps, remote, token, slurm_conn_id)
    s.study = load_sweep(paths["study"])
    s.nightly = load_sweep(paths["nightly"])
    s.secret = load_sweep(paths["secret"])
    experiments = s.study.experiments + s.nightly.experiments + s.secret.experiments
    ids = [e.dag_id for e in experiments] + [f"oellm__{s.nightly.name}"]
    wait(lambda: all(s.http("GET", f"/dags/{d}") for d in ids), 240, "the factory's DAGs parsed", s)
    return s


def states(stack, dag_id: str, run_id: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for ti in stack.task_instances(dag_id, run_id):
        found.setdefault(ti["task_id"], []).append(ti["state"])
    return found


def test_cli_trigger_with_conf_changes_train_iters(stack, dev_cluster):
    exp = stack.study.experiment("cli")
    run_id = f"cli_{uuid.uuid4().hex[:6]}"
    stack.cli("dags", "trigger", exp.dag_id, "--run-id", run_id, "--conf", json.dumps({"backend.args.train_iters": 30}))
    assert stack.wait_run(exp.dag_id, run_id, 900) == "success", stack.explain(exp.dag_id, run_id)
    # the production topology (tests/shared_stack.py): every task ran on one of its two Celery workers
    ran_on = {ti["hostname"] for ti in stack.task_instances(exp.dag_id, run_id) if ti["state"] == "success"}
    assert stack.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and ran_on <= {"worker-1", "worker-2"}, ran_on
    found = states(stack, exp.dag_id, run_id)
    assert found["checkpoint.evaluate"] == ["success"] * 3, found  # 10, 20 and the new end, 30
    assert found["cooldown.train"] == ["success"] and found["outcome"] == ["skipped"], found
    assert stack.xcom(exp.dag_id, run_id, "train")["last_iteration"] == 30
    assert stack.xcom(exp.dag_id, run_id, "prepare", "overrides") == ["backend.args.train_iters=30"]
    report = stack.xcom(exp.dag_id, run_id, "report")
    assert {r["iteration"] for r in report["rows"] if r["run"] == exp.name} == {10, 20, 30}
    out = exp.paths.output_dir
    provenance = json.loads(dev_cluster.ssh(["cat", f"{out}/provenance/run.json"]).stdout)
    assert provenance["run_id"] == run_id and provenance["overrides"] == ["backend.args.train_iters=30"]
    resolved = json.loads(dev_cluster.ssh(["cat", f"{out}/provenance/resolved.json"]).stdout)
    assert resolved["backend"]["args"]["train_iters"] == 30
    assert (
        dev_cluster.ssh(["test", "-s", f"{out}/evaluations/iter_0000030/final_bench.json"], check=False).returncode == 0
    )


def test_rest_trigger_with_free_overrides(stack, dev_cluster):
    exp = stack.study.experiment("rest")
    run_id = stack.trigger(exp.dag_id, {"overrides": ["backend.args.lr=5.0e-4"]})
    assert stack.wait_run(exp.dag_id, run_id, 900) == "success", stack.explain(exp.dag_id, run_id)
    log_path = stack.xcom(exp.dag_id, run_id, "train", "log_path")
    assert "learning rate: 5.000000E-04" in dev_cluster.ssh(["cat", log_path]).stdout
    cooled = f"{exp.paths.output_dir}_cooldown_10"
    assert dev_cluster.ssh(["cat", f"{cooled}/checkpoints/latest_checkpointed_iteration.txt"]).stdout == "15"


def test_bad_conf_never_reaches_slurm(stack, dev_cluster):
    exp = stack.study.experiment("bad")
    runs = []
    for conf in ({"overrides": ["backend.args.lrr=0.1"]}, {"experiment.name": "x"}, {"backend.args.train_iters": "x"}):
        try:
            runs.append(stack.trigger(exp.dag_id, conf))
        except urllib.error.HTTPError as exc:  # typed Params: the API refuses the run outright
            assert exc.code == 400 and "train_iters" in exc.read().decode(), conf
    assert len(runs) == 2
    for run_id in runs:
        assert stack.wait_run(exp.dag_id, run_id, 300) == "failed"
        found = states(stack, exp.dag_id, run_id)
        assert found["prepare"] == ["failed"] and found["train"] == ["upstream_failed"], found
    scripts = dev_cluster.ssh(["squeue", "-h", "--me", "-t", "all", "-o", "%o"]).stdout.split()
    assert [s for s in scripts if s.startswith(exp.paths.output_dir)] == []
    assert dev_cluster.ssh(["test", "-e", f"{exp.paths.output_dir}/scripts"], check=False).returncode != 0


def test_sweep_dag_runs_its_experiments_and_backfill_keeps_runs_apart(stack, dev_cluster):
    sweep = stack.nightly
    run_id = stack.trigger(f"oellm__{sweep.name}")
    assert stack.wait_run(f"oellm__{sweep.name}", run_id, 600) == "success", stack.explain(
        f"oellm__{sweep.name}", run_id
    )
    summary = stack.xcom(f"oellm__{sweep.name}", run_id, "summary")
    assert [(r["experiment"], r["state"], r["iteration"]) for r in summary["rows"]] == [
        (e.name, "success", 20) for e in sweep.experiments
    ]
    assert all(r["train_loss"] > 0 and r["attempts"] == 1 for r in summary["rows"]), summary
    exp = sweep.experiments[0]
    # through the REST API, one transaction in the api-server: the CLI's retry on SQLite's "database is
    # locked" once re-created a backfill whose first run the scheduler had already started
    stack.http(
        "POST",
        "/backfills",
        {"dag_id": exp.dag_id, "from_date": "2026-11-20T00:00:00Z", "to_date": "2026-11-21T00:00:00Z"},
    )
    wanted = {"2026-11-20", "2026-11-21"}

    def backfilled() -> list[dict]:
        runs = [r for r in stack.runs(exp.dag_id) if r["run_type"] == "backfill"]
        done = [r for r in runs if r["state"] in ("success", "failed")]
        return done if len(done) == len(wanted) else []

    runs = wait(backfilled, 900, "two backfill runs finished", stack, every=5)
    assert {r["logical_date"][:10] for r in runs} == wanted
    assert {r["state"] for r in runs} == {"success"}
    # each interval trained in its own directory, named after its logical date
    base = exp.config.project.base_output_dir
    for day in ("20261120T000000", "20261121T000000"):
        tracker = f"{base}/runs/{day}/{exp.name}/checkpoints/latest_checkpointed_iteration.txt"
        assert dev_cluster.ssh(["cat", tracker]).stdout == "20", day


def test_sweep_secrets_reach_the_job_and_no_file_log_or_database_row(stack, dev_cluster, reliability):
    """platform.secrets names a Variable and a Connection's password: the job sees both (their digests in
    its log), and neither value is in the job's tree, the Airflow home (logs) or the PostgreSQL database."""
    exp = stack.secret.experiments[0]
    run_id = stack.trigger(exp.dag_id)
    assert stack.wait_run(exp.dag_id, run_id, 600) == "success", stack.explain(exp.dag_id, run_id)
    values = stack_secrets(stack.home)
    log = dev_cluster.ssh(["cat", stack.xcom(exp.dag_id, run_id, "train", "log_path")]).stdout
    for name, value in zip(("OELLM_TOKEN", "OELLM_PASSWORD"), values, strict=True):
        assert f"secret digest {name}: {hashlib.sha256(value.encode()).hexdigest()}" in log, name
    out = exp.paths.output_dir
    dump = stack.database_dump()
    assert exp.dag_id.encode() in dump  # the dump holds the run's rows
    for value in values:
        marker = value.split(";")[0].split("'")[0]
        remote = dev_cluster.ssh(["grep", "-rlF", "--", marker, out], check=False).stdout.split()
        local = [str(p) for p in stack.home.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
        assert remote == [] and local == [] and marker.encode() not in dump, (remote, local)
    assert dev_cluster.ssh(["find", out, "-name", "PWNED"]).stdout.strip() == ""
    reliability.record(
        "secrets from a sweep (a Variable, a Connection's password) on PostgreSQL and Celery",
        "reached the job (their hashes in its log); in no file of the job's tree or the Airflow home, no row",
        files_holding_the_secret=0,
    )
