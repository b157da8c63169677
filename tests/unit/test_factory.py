"""The DAG factory without a cluster: which DAGs the project's DAG file registers, their shape,
tags, trigger form, documentation; errors that stay in their file; one-DAG parsing for workers."""

from __future__ import annotations

import copy
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.dag_factory import experiment_dag, load_dags
from airflow_oellm.monitor.records import AttemptHistory
from airflow_oellm.operators.prepare import check_protected, override_strings, run_params
from tests.conftest import EXAMPLE_SWEEPS, REPO

pytestmark = pytest.mark.factory
DAG_FILE = REPO / "dags" / "oellm_sweeps.py"


@pytest.fixture(scope="module")
def project_dags() -> dict:
    return load_dags([REPO / "config" / "sweeps"])


def test_one_dag_per_experiment_and_one_per_sweep(project_dags):
    expected = {"oellm_reconcile"}
    for path in EXAMPLE_SWEEPS:
        sweep = load_sweep(path)
        expected |= {f"oellm__{sweep.name}__{e.name}" for e in sweep.experiments} | {f"oellm__{sweep.name}"}
    assert set(project_dags) == expected
    assert "oellm__config_errors" not in project_dags


def test_one_reconcile_task_per_cluster_over_every_experiment_on_it(project_dags):
    dag = project_dags["oellm_reconcile"]
    experiments = sorted(d for d in project_dags if d.count("__") == 2)
    (task,) = dag.tasks  # every example sweep runs on the dev cluster
    assert task.task_id == "cancel_orphans_ssh_slurm_dev" and task.cluster.ssh_conn_id == "slurm_dev"
    assert sorted(task.dag_ids) == experiments
    assert dag.schedule == timedelta(minutes=15) and not dag.catchup and dag.max_active_runs == 1
    assert dag.is_paused_upon_creation is False


def test_reconcile_interval_comes_from_airflow_config(monkeypatch, tmp_path):
    from airflow_oellm.dag_factory.builder import reconcile_interval

    monkeypatch.setenv("AIRFLOW__OELLM__RECONCILE_INTERVAL_MINUTES", "0")
    assert reconcile_interval() is None
    monkeypatch.setenv("AIRFLOW__OELLM__RECONCILE_INTERVAL_MINUTES", "3")
    assert reconcile_interval() == timedelta(minutes=3)
    monkeypatch.setenv("AIRFLOW__OELLM__RECONCILE_INTERVAL_MINUTES", "-1")
    with pytest.raises(ValueError, match="reconcile_interval_minutes must be >= 0, not -1"):
        reconcile_interval()
    # a bad setting is the reconcile DAG's import error; every sweep's DAGs still load
    dags = load_dags([REPO / "config" / "sweeps"])
    assert "oellm_reconcile" not in dags and len(dags) > 2
    with pytest.raises(ConfigError, match=r"oellm_reconcile is not built.*reconcile_interval_minutes must be >= 0"):
        dags["oellm__config_errors"].validate()


def test_experiment_dag_settings(project_dags):
    sweep = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml")
    exp = sweep.experiments[0]
    dag = project_dags[exp.dag_id]
    assert dag.max_active_runs == 1 and dag.schedule is None and not dag.catchup
    assert {"oellm", f"sweep:{sweep.name}", "platform:devcluster", "model:50M"} <= set(dag.tags)
    assert dag.default_args["owner"] == exp.config.project.owner
    assert exp.name in dag.doc_md and '"train_iters": 150000' in dag.doc_md
    train = dag.get_task("train")
    assert train.retries == exp.config.restart.max_attempts - 1
    assert dag.get_task("prepare").downstream_task_ids >= {"train"}


def test_experiment_dag_shape(project_dags):
    exp = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    dag = project_dags[exp.dag_id]
    assert set(dag.task_ids) == {
        "prepare",
        "train",
        "checkpoint.wait",
        "checkpoint.convert",
        "checkpoint.evaluate",
        "cooldown_plan",
        "cooldown.wait",
        "cooldown.train",
        "cooldown.convert",
        "cooldown.evaluate",
        "report",
        "outcome",
    }
    assert dag.get_task("checkpoint.wait").downstream_task_ids == {"checkpoint.convert", "outcome"}
    assert dag.get_task("cooldown.wait").downstream_task_ids == {"cooldown.train", "outcome"}
    assert dag.get_task("report").trigger_rule == "all_done"
    outcome = dag.get_task("outcome")
    assert outcome.trigger_rule == "one_failed" and outcome.upstream_task_ids == set(dag.task_ids) - {"outcome"}
    # the branches wait beside the training, not after it
    assert "train" not in dag.get_task("checkpoint.wait").upstream_task_ids
    assert dag.get_task("checkpoint.wait").map_index_template == "{{ task.iteration }}"


def test_every_task_the_report_and_dashboard_read_is_built(project_dags):
    from airflow_oellm.dashboard.queries import XCOM_TASKS
    from airflow_oellm.operators.report import ExperimentReportOperator

    exp = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    dag = project_dags[exp.dag_id]
    report = dag.get_task("report")
    assert isinstance(report, ExperimentReportOperator)
    read = {*XCOM_TASKS, report.prepare_task_id, report.train_task_id, report.cooldown_task_id}
    read |= {f"{group}.{task}" for group in ("checkpoint", "cooldown") for task in report.side_job_task_ids}
    assert read <= set(dag.task_ids)
    assert dag.get_task("checkpoint.wait").training_task_id == "train"


def test_sweep_dag_runs_and_summarises_its_experiments(project_dags):
    sweep = load_sweep(REPO / "config" / "sweeps" / "scaling_study.yaml")
    dag = project_dags[f"oellm__{sweep.name}"]
    assert set(dag.task_ids) == {"run", "summary", "analysis", "outcome"}
    run = dag.get_task("run")
    assert run.expand_input.value["trigger_dag_id"] == [e.dag_id for e in sweep.experiments]
    assert dag.get_task("summary").experiments == {e.dag_id: e.name for e in sweep.experiments}
    # the analysis reads the same reports, after the summary, and writes beside the experiments' outputs
    analysis = dag.get_task("analysis")
    assert analysis.experiments == dag.get_task("summary").experiments and analysis.upstream_task_ids == {"summary"}
    base = sweep.experiments[0].config.project.base_output_dir
    assert (analysis.sweep, analysis.output_dir) == (sweep.name, f"{base}/_analysis/{sweep.name}")
    assert dag.get_task("outcome").upstream_task_ids == {"run", "summary", "analysis"}


@pytest.mark.faults
def test_a_sweep_larger_than_max_map_length_runs_from_several_trigger_tasks(write, monkeypatch):
    from types import SimpleNamespace

    from airflow_oellm.dag_factory import sweep_dag

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "10")
    path = write(
        "s/big.yaml",
        "defaults: [{platform: devcluster}]\nproject: {name: big, base_output_dir: /tmp/x}\n"
        "backend: {args: {seed: '${vars.i}'}}\nsweep: {axes: {i: [" + ", ".join(map(str, range(25))) + "]}}\n",
    )
    sweep = load_sweep(path)
    dag = sweep_dag(sweep)
    ids = [e.dag_id for e in sweep.experiments]
    parts = [dag.get_task(f"run_{n}").expand_input.value["trigger_dag_id"] for n in (1, 2, 3)]
    assert parts == [ids[:10], ids[10:20], ids[20:]] and "run" not in dag.task_ids
    assert dag.get_task("outcome").upstream_task_ids == {"run_1", "run_2", "run_3", "summary", "analysis"}
    summary = dag.get_task("summary")
    assert summary.upstream_task_ids == {"run_1", "run_2", "run_3"}

    pulled = []

    def xcom_pull(task_ids, map_indexes=None, key=None, **_):
        pulled.append((task_ids, map_indexes))

    ti = SimpleNamespace(xcom_pull=xcom_pull)
    rows = summary.execute({"ti": ti})["rows"]
    assert len(rows) == 25 and {r["state"] for r in rows} == {"not started"}
    assert pulled[9] == ("run_1", 9) and pulled[10] == ("run_2", 0) and pulled[24] == ("run_3", 4)


def test_without_conversion_or_cooldowns_the_dag_is_train_and_report(project_dags):
    exp = load_sweep(REPO / "config" / "sweeps" / "minimal.yaml", ["conversion.enabled=false"]).experiments[0]
    sweep = load_sweep(REPO / "config" / "sweeps" / "minimal.yaml", ["conversion.enabled=false"])
    dag = experiment_dag(sweep, exp)
    assert set(dag.task_ids) == {"prepare", "train", "report", "outcome"}


def test_trigger_form_params_are_typed(project_dags):
    from airflow.sdk.exceptions import ParamValidationError

    exp = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    params = project_dags[exp.dag_id].params
    assert params["backend.args.train_iters"] == 150000 and params["overrides"] == []
    assert set(params) >= {"backend.args.save_interval", "slurm.time", "cooldowns.at"}
    assert "backend.args.lr" not in params  # swept: it is what tells this experiment from the others
    assert params["cooldowns.at"] == [10000, 50000, 100000]
    for key, bad in (("backend.args.train_iters", "lots"), ("overrides", "lr=1"), ("cooldowns.at", ["x"])):
        form = copy.deepcopy(params)
        with pytest.raises(ParamValidationError):
            form[key] = bad
    form = copy.deepcopy(params)
    form["backend.args.train_iters"] = 500
    assert form.validate()["backend.args.train_iters"] == 500


def test_run_overrides_from_form_and_free_list():
    config = {"backend": {"args": {"train_iters": 100, "lr": 3e-4}}, "slurm": {"time": "01:00:00"}}
    params = run_params(config, ["backend.args.train_iters", "backend.args.lr", "slurm.time", "missing.key"])
    defaults = {k: p.value for k, p in params.items() if k != "overrides"}
    assert "missing.key" not in params
    values = {**defaults, "backend.args.train_iters": 500, "overrides": ["+backend.args.foo=1"]}
    assert override_strings(values, defaults) == ["backend.args.train_iters=500", "+backend.args.foo=1"]
    assert override_strings(defaults, defaults) == []
    for protected in ("experiment.output_dir=/x", "project.base_output_dir=/y", "~project.name"):
        with pytest.raises(Exception, match="identifies the experiment"):
            check_protected([protected])
    check_protected(["backend.args.lr=1e-4", "slurm.time=02:00:00"])


def bag(dag_folder: Path, monkeypatch, sweeps: list[Path]):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("OELLM_SWEEPS_PATH", ":".join(map(str, sweeps)))
    return DagBag(dag_folder=str(dag_folder))


def test_dag_file_reads_sweeps_path_and_keeps_errors_local(tmp_path, write, monkeypatch):
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    head = "defaults: [{platform: devcluster}]\nproject: {name: %s, base_output_dir: /tmp/x}\n"
    good = write("a/good.yaml", head % "good" + "backend: {args: {seed: '${vars.i}'}}\nsweep: {axes: {i: [1, 2]}}\n")
    write("b/other.yaml", head % "other")
    write("b/broken.yaml", head % "broken" + "slurm: {nodez: 2}\n")
    dagbag = bag(folder, monkeypatch, [good.parent, tmp_path / "b"])
    ids = set(dagbag.dag_ids)
    assert {"oellm__good__good_i1", "oellm__good__good_i2", "oellm__good", "oellm__other__other"} <= ids
    assert not any("broken" in i for i in ids)
    (message,) = dagbag.import_errors.values()
    assert "broken.yaml" in message and "slurm.nodez" in message and "nodes" in message


def test_sweep_directories_from_env_and_airflow_option(tmp_path, monkeypatch):
    from airflow_oellm.dag_factory import configured_directories

    monkeypatch.setenv("OELLM_SWEEPS_PATH", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("AIRFLOW__OELLM__SWEEPS_PATH", f"{tmp_path}/c:{tmp_path}/a")
    assert configured_directories([f"{tmp_path}/project"]) == [f"{tmp_path}/{d}" for d in ("project", "a", "b", "c")]


def test_a_worker_builds_only_the_dag_it_runs(tmp_path, write, monkeypatch):
    # the sweep renames itself: the file stem does not say which file holds the DAG
    head = "defaults: [{platform: devcluster}]\nproject: {name: %s, base_output_dir: /tmp/x}\n"
    write(
        "s/study.yaml", head % "p" + "backend: {args: {seed: '${vars.i}'}}\nsweep: {name: renamed, axes: {i: [1, 2]}}\n"
    )
    write("s/other.yaml", head % "q")
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "oellm__renamed__p_i2")
    assert list(load_dags([tmp_path / "s"])) == ["oellm__renamed__p_i2"]
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "oellm__other__q")
    assert list(load_dags([tmp_path / "s"])) == ["oellm__other__q"]


def test_scheduled_sweep(write):
    path = write(
        "s/nightly.yaml",
        "defaults: [{platform: devcluster}]\nproject: {name: n, base_output_dir: /tmp/x}\n"
        "dag: {schedule: '@daily', start_date: '2026-11-01', catchup: true, tags: [speed]}\n",
    )
    sweep = load_sweep(path)
    dag = experiment_dag(sweep, sweep.experiments[0])
    assert dag.catchup and dag.start_date.isoformat() == "2026-11-01T00:00:00+00:00" and "speed" in dag.tags
    assert dag.get_task("prepare").scheduled


def test_project_sbatch_templates_reach_the_operators(write, project):
    """A config root's templates/ is used for every script a run submits, as by `airflow-oellm render`."""
    from airflow_oellm.operators.submit import SlurmSubmitOperator

    write(
        "config/templates/mini.sbatch.j2",
        '{% extends "base.sbatch.j2" %}\n{% block platform %}\necho "site hook {{ exp.name }}"\n{% endblock %}\n',
    )
    path = write(
        "config/sweeps/t.yaml",
        "defaults: [{platform: mini}]\nproject: {name: t, base_output_dir: /r}\nplatform: {template: mini.sbatch.j2}\n"
        "backend: {args: {train_iters: 20, save_interval: 10}}\n",
    )
    sweep = load_sweep(path)
    exp = sweep.experiments[0]
    dag = experiment_dag(sweep, exp)
    for task_id in ("train", "checkpoint.convert", "checkpoint.evaluate"):
        dirs = dag.get_task(task_id).template_dirs
        assert dirs == [str(d) for d in sweep.template_dirs] and str(project / "templates") in dirs, task_id
    for job in (None, {"kind": "convert", "iteration": 10, "cooldown": None}):
        op = SlurmSubmitOperator(task_id="t", experiment=exp.resolved, job=job, template_dirs=sweep.template_dirs)
        op.experiment, op.job = exp.resolved, job  # as template rendering leaves them at run time
        assert 'echo "site hook ' in op._script(op._settings(), AttemptHistory(), None)


def test_site_requirements_resolve_on_the_airflow_host_when_the_dag_file_is_parsed(tmp_path, write, monkeypatch):
    """`${oc.env:LUMI_PROJECT,null}` is read from the environment of the process that parses the DAG file."""
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    sweep = write("s/lumi.yaml", "defaults: [{platform: lumi}]\nproject: {name: onlumi, base_output_dir: /scratch/x}\n")
    monkeypatch.delenv("LUMI_PROJECT", raising=False)
    dagbag = bag(folder, monkeypatch, [sweep.parent])
    assert not [d for d in dagbag.dag_ids if "onlumi" in d]
    (message,) = dagbag.import_errors.values()
    assert "slurm.account: platform 'lumi' requires it" in message and "export LUMI_PROJECT" in message
    monkeypatch.setenv("LUMI_PROJECT", "project_465000123")
    dagbag = bag(folder, monkeypatch, [sweep.parent])
    assert "oellm__lumi__onlumi" in dagbag.dag_ids and not dagbag.import_errors
    prepare = dagbag.dags["oellm__lumi__onlumi"].get_task("prepare")
    config = load_sweep(prepare.sweep_file, only="onlumi").experiment("onlumi").config
    assert config.slurm.account == "project_465000123"


def test_the_branch_groups_take_exactly_the_planned_keys():
    """The mapped task groups get each milestone entry as keyword arguments: their parameters must be
    the declared branch shapes' keys, and the planner must make entries of exactly those keys."""
    import inspect
    from typing import get_type_hints

    from airflow_oellm.config.milestones import CheckpointBranch, CooldownBranch, plan
    from airflow_oellm.dag_factory.builder import checkpoint_group, cooldown_group, task_kwargs

    sweep = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml")
    kw = task_kwargs(sweep, sweep.experiments[0].config)
    for group, shape in (
        (checkpoint_group(None, kw), CheckpointBranch),
        (cooldown_group(None, kw, True), CooldownBranch),
    ):
        assert list(inspect.signature(group.function).parameters) == list(get_type_hints(shape))
    milestones = plan(sweep.experiments[0].runtime_config())
    assert milestones.evaluations and milestones.cooldowns
    assert all(list(e) == list(get_type_hints(CheckpointBranch)) for e in milestones.evaluations)
    assert all(list(c) == list(get_type_hints(CooldownBranch)) for c in milestones.cooldowns)
