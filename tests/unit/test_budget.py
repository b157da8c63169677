"""GPU-hour budgets: planned hours per run (training, cooldowns, side jobs), `plan`'s figures, and the
refusals of the loader (validate, the DAG factory) and of `prepare`."""

from __future__ import annotations

import json

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.budget import planned_gpu_hours
from airflow_oellm.dag_factory import load_dags

pytestmark = [pytest.mark.config, pytest.mark.budget]

SWEEP = """
defaults: [{platform: mini}]
project: {name: b, base_output_dir: /r, gpu_hour_budget: %(budget)s}
slurm: {nodes: 2, gpus_per_node: 4, time: "1:00:00"}
restart: {max_attempts: 3}
backend: {args: {train_iters: 100, save_interval: 50}}
conversion: {resources: {gpus_per_node: 0, time: 600}}
evaluation:
  resources: {gpus_per_node: 1, time: "0:30:00"}
  suites: [{name: quick, when: every}]
cooldowns: [{at: 50, overrides: [slurm.time=1800, backend.args.train_iters=60]}]
sweep: {axes: {backend.args.lr: [0.1, 0.2, 0.3]}}
"""


def sweep_file(write, budget="null", extra=""):
    return write("config/sweeps/b.yaml", SWEEP % {"budget": budget} + extra)


def test_planned_hours_count_every_job_at_its_limit_and_every_attempt(write, project):
    experiment = load_sweep(sweep_file(write)).experiments[0]
    planned = planned_gpu_hours(experiment.runtime_config())
    assert planned.training == 2 * 4 * 1.0 * 3  # nodes x GPUs x hours x attempts
    assert planned.cooldowns == 2 * 4 * 0.5 * 3  # the cooldown's own time limit
    # evaluations at 50, 100 and the cooldown's final 60: one GPU, half an hour, two attempts each;
    # conversions hold no GPU
    assert planned.side_jobs == 3 * 1 * 0.5 * 2
    assert planned.as_record() == {"training": 24.0, "cooldowns": 12.0, "side_jobs": 3.0, "total": 39.0}


def test_plan_shows_each_experiment_against_the_budget(write, project, capsys):
    path = sweep_file(write, budget=200)
    assert cli(["plan", str(path), "+project.gpu_hour_budget_per_experiment=50"]) == 0
    out = capsys.readouterr().out
    assert out.count("39.0 / 50.0") == 3
    assert "planned: 117.0 GPU-hours of a budget of 200.0 (project.gpu_hour_budget)" in out
    assert cli(["plan", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["planned_gpu_hours"]["total"] for r in rows] == [39.0, 39.0, 39.0]


def test_a_sweep_over_its_budget_is_refused_with_the_figures(write, project, capsys):
    path = sweep_file(write, budget=100)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    [issue] = err.value.issues
    assert issue.key == "project.gpu_hour_budget" and issue.file == str(path) and issue.line == 2
    assert issue.message.startswith("the sweep plans 117.0 GPU-hours for 3 experiment(s), over its budget of 100.0")
    assert "(largest: b_lr0.1 39.0, b_lr0.2 39.0, b_lr0.3 39.0;" in issue.message
    # plan still shows the figures, then refuses
    assert cli(["plan", str(path)]) == 1
    captured = capsys.readouterr()
    assert "planned: 117.0 GPU-hours of a budget of 100.0" in captured.out
    assert "over its budget of 100.0" in captured.err
    assert cli(["validate", str(path)]) == 1
    # the DAG factory: a config error, no DAG
    dags = load_dags([path.parent])
    assert "oellm__config_errors" in dags and not [d for d in dags if d.startswith("oellm__b")]
    # 117 fits a budget of 120
    assert len(load_sweep(sweep_file(write, budget=120)).experiments) == 3


def test_the_per_experiment_limit_names_the_experiment(write, project):
    path = sweep_file(write)
    with pytest.raises(ConfigError) as err:
        load_sweep(path, ["+project.gpu_hour_budget_per_experiment=38.5"])
    assert [i.key for i in err.value.issues] == ["project.gpu_hour_budget_per_experiment"] * 3
    assert err.value.issues[0].message.startswith(
        "experiment b_lr0.1 is over its GPU-hour budget: 39.0 planned: training 24.0, cooldowns 12.0, "
        "conversions and evaluations 3.0, every job at its time limit and every attempt, limit 38.5"
    )
    # a worker loading one experiment checks its own limit too
    with pytest.raises(ConfigError, match=r"experiment b_lr0\.2 is over its GPU-hour budget"):
        load_sweep(path, ["+project.gpu_hour_budget_per_experiment=38.5"], only="b_lr0.2")


def test_no_budget_plans_nothing_at_load_time(write, project, monkeypatch):
    # planning every run costs parse time: only sweeps with a budget pay it
    import airflow_oellm.config.loader as loader

    def must_not_plan(*args, **kwargs):
        raise AssertionError("planned without a budget")

    monkeypatch.setattr(loader, "planned_gpu_hours", must_not_plan)
    assert len(load_sweep(sweep_file(write)).experiments) == 3


def test_a_swept_budget_is_refused(write, project):
    path = sweep_file(write, budget=500)
    # a budget swept beside the axis it would go with: one figure per sweep, not per experiment
    text = path.read_text().replace(
        "sweep: {axes: {backend.args.lr: [0.1, 0.2, 0.3]}}",
        "sweep: {type: list, groups: [{backend.args.lr: 0.1, project.gpu_hour_budget: 500}, "
        "{backend.args.lr: 0.2, project.gpu_hour_budget: 600}]}",
    )
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"project\.gpu_hour_budget: must be the same for every experiment"):
        load_sweep(path)
    # swept alone it changes no job: refused as such
    inert = (SWEEP % {"budget": 500}).replace("backend.args.lr: [0.1, 0.2, 0.3]", "project.gpu_hour_budget: [500, 600]")
    path.write_text(inert)
    with pytest.raises(ConfigError, match=r"sweep\.axes\.project\.gpu_hour_budget: changes no job"):
        load_sweep(path)


def prepare_task(path, conf):
    from datetime import UTC, datetime
    from types import SimpleNamespace

    dag = load_dags([path.parent])["oellm__b__b_lr0.2"]
    run = SimpleNamespace(
        conf=conf, run_after=datetime.now(UTC), logical_date=None, run_id="manual__b", dag_id="oellm__b__b_lr0.2"
    )
    return dag.get_task("prepare"), run, dict(dag.params)


def test_prepare_refuses_a_run_its_overrides_push_over_the_budget(write, project):
    from airflow.sdk.exceptions import AirflowFailException

    path = sweep_file(write, budget=120)  # 3 x 39.0 = 117.0 planned
    task, run, params = prepare_task(path, {})
    assert task._apply_conf(run, params).planned.as_record()["total"] == 39.0
    task, run, params = prepare_task(path, {"overrides": ["slurm.nodes=3"]})
    with pytest.raises(AirflowFailException) as failure:
        task._apply_conf(run, params)
    # three nodes: training 3 x 4 x 1 h x 3, the cooldown (it inherits them) 3 x 4 x 0.5 h x 3, evaluations 3
    assert (
        "b.yaml:2: project.gpu_hour_budget: the sweep plans 135.0 GPU-hours with this run's overrides "
        "(this run: 57.0) for 3 experiment(s), over its budget of 120.0 (largest: b_lr0.2 57.0, b_lr0.1 39.0, "
        "b_lr0.3 39.0;"
    ) in str(failure.value)
    # the retries are the DAG's (Airflow sets them when it builds the DAG): a run cannot add attempts
    task, run, params = prepare_task(path, {"overrides": ["restart.max_attempts=4"]})
    with pytest.raises(AirflowFailException, match=r"'restart\.max_attempts=4' changes nothing this run submits"):
        task._apply_conf(run, params)
    # a per-experiment limit in the sweep file applies to each run of it, with the run's overrides
    path.write_text(path.read_text().replace("gpu_hour_budget: 120", "gpu_hour_budget_per_experiment: 40"))
    task, run, params = prepare_task(path, {"overrides": ["slurm.nodes=3"]})
    with pytest.raises(AirflowFailException, match=r"experiment b_lr0\.2 is over its GPU-hour budget: 57\.0 planned"):
        task._apply_conf(run, params)


def test_the_report_adds_up_what_every_job_used_against_the_plan():
    from airflow_oellm.monitor.accounting import used_gpu_hours_by_kind
    from airflow_oellm.operators.report import gpu_hours_line

    used = used_gpu_hours_by_kind(
        {
            "training": [{"attempts": [{"gpu_hours": 8.0}, {"gpu_hours": 2.5}]}],
            "cooldowns": [{"attempts": [{"gpu_hours": 1.5}]}, None],  # a cooldown that never ran
            "side_jobs": [{"attempts": [{"gpu_hours": 0.25}, {"gpu_hours": None}]}, {}],
        }
    )
    assert used == {"training": 10.5, "cooldowns": 1.5, "side_jobs": 0.25, "total": 12.25}
    planned = {"training": 24.0, "cooldowns": 12.0, "side_jobs": 3.0, "total": 39.0}
    assert gpu_hours_line(planned, used) == (
        "GPU-hours used: 12.2 of 39 planned (training 10.5 of 24, cooldowns 1.5 of 12, "
        "conversions and evaluations 0.25 of 3)"
    )
    assert gpu_hours_line(None, used) == "GPU-hours used: 12.2"


def test_a_cooldown_branch_converts_even_without_suites_and_the_plan_counts_it(write, project):
    # evaluations off: no checkpoint branch entries, but the cooldown's final checkpoint is still converted
    path = sweep_file(write)
    text = path.read_text().replace("  suites: [{name: quick, when: every}]\n", "  enabled: false\n")
    path.write_text(text.replace("gpus_per_node: 0, time: 600", "gpus_per_node: 1, time: 600"))
    experiment = load_sweep(path).experiments[0]
    planned = planned_gpu_hours(experiment.runtime_config())
    assert planned.side_jobs == 1 * 1 * (600 / 3600) * 2  # one conversion, two attempts, nothing evaluated


def test_an_unlimited_time_limit_plans_unlimited_hours(write, project, capsys):
    path = sweep_file(write)
    experiment = load_sweep(path, ["slurm.time=UNLIMITED"]).experiments[0]
    record = planned_gpu_hours(experiment.runtime_config()).as_record()
    assert record["training"] is None and record["total"] is None and record["side_jobs"] == 3.0
    json.dumps(record, allow_nan=False)  # it travels as XCom: no Infinity
    with pytest.raises(ConfigError, match=r"unlimited planned: training unlimited"):
        load_sweep(path, ["slurm.time=UNLIMITED", "+project.gpu_hour_budget_per_experiment=1000"])


def test_an_invalid_side_job_time_is_a_config_error_when_planning(write, project):
    path = sweep_file(write, budget=1000)
    with pytest.raises(ConfigError, match=r"evaluation\.resources\.time: "):
        load_sweep(path, ["evaluation.resources.time=soon"])


def test_a_cooldown_cannot_override_what_its_parents_dag_sets(write, project):
    path = sweep_file(write)
    path.write_text(
        path.read_text().replace("overrides: [slurm.time=1800,", "overrides: [restart.max_attempts=9, slurm.time=1800,")
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path, ["+project.gpu_hour_budget_per_experiment=1000"])
    assert "a cooldown is a task of its parent's DAG, which sets its retries, schedule and project: " in str(err.value)
    assert "'restart.max_attempts=9' would change nothing" in str(err.value)


def test_a_run_cannot_ask_for_branches_its_dag_was_built_without(write, project):
    from airflow.sdk.exceptions import AirflowFailException

    path = sweep_file(write)
    # the same sweep without its cooldown: its DAG has no cooldown branch
    path.write_text(
        path.read_text().replace(
            "cooldowns: [{at: 50, overrides: [slurm.time=1800, backend.args.train_iters=60]}]\n", ""
        )
    )
    task, run, params = prepare_task(path, {"overrides": ["+cooldowns=[{at: 50}]"]})
    with pytest.raises(AirflowFailException, match=r"cooldowns: this DAG has no cooldown branch"):
        task._apply_conf(run, params)


def test_two_overrides_of_one_key_name_the_other(write, project):
    from airflow.sdk.exceptions import AirflowFailException

    path = sweep_file(write)
    # the trigger form's field and the free list set the same value: the first is the one that does nothing
    task, run, params = prepare_task(path, {"slurm.time": "0:30:00", "overrides": ["slurm.time=0:30:00"]})
    with pytest.raises(AirflowFailException) as failure:
        task._apply_conf(run, params)
    assert "override 'slurm.time=\"0:30:00\"' changes nothing this run submits or watches: override " in str(
        failure.value
    )
    assert "sets the same key" in str(failure.value)


def test_an_evaluation_with_no_suite_due_submits_nothing():
    from airflow.sdk.exceptions import AirflowSkipException

    from airflow_oellm.operators.submit import SlurmSubmitOperator

    task = SlurmSubmitOperator(task_id="evaluate", experiment={"any": "config"}, job={"kind": "evaluate"})
    task.job = {"kind": "evaluate", "iteration": 60, "suites": []}  # as Airflow renders the branch's XCom
    with pytest.raises(AirflowSkipException, match="no evaluation suite is due for this checkpoint"):
        task.execute({})  # before any connection or context is touched


def test_a_run_refused_over_the_budget_tells_the_sweeps_notifiers(write, project, receiver):
    from airflow.sdk.exceptions import AirflowFailException

    notify = f"notifications: {{notify: [{{webhook: '{receiver.url}', events: [budget_reached]}}], "
    path = sweep_file(write, budget=120, extra=notify + "dashboard_url: 'http://a/oellm'}\n")
    task, run, params = prepare_task(path, {})
    task._apply_conf(run, params)
    assert receiver.received == []  # within the budget: nothing to tell
    task, run, params = prepare_task(path, {"overrides": ["slurm.nodes=3"]})
    with pytest.raises(AirflowFailException, match=r"over its budget of 120\.0"):
        task._apply_conf(run, params)
    (body,) = receiver.received
    assert body["alert"]["event"] == "budget_reached" and body["alert"]["experiment"] == "b_lr0.2"
    assert body["text"].startswith("[oellm] b/b_lr0.2: over budget: ")
    assert "the sweep plans 135.0 GPU-hours" in body["text"]
    assert body["text"].endswith(" http://a/oellm/experiments/oellm__b__b_lr0.2?run_id=manual__b")
