"""The dashboard's data assembly (no Airflow, no database): rows, curves, evaluations, timeline, SVG."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.dashboard.model import (
    ExperimentView,
    LiveReports,
    RunRecord,
    SweepRequest,
    SweepView,
    TaskRecord,
    distributions,
    experiment_status,
    experiment_view,
    histogram,
    run_gpu_hours_so_far,
    sorted_experiments,
    sweep_page,
    sweep_view,
)
from airflow_oellm.dashboard.plot import Series, downsampled, line_plot, nice_ticks, step_points
from airflow_oellm.monitor.outage import Outage
from airflow_oellm.monitor.watch import PROGRESS_CURVE, JobWatch, WatchState, merged_curve, thinned
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.states import JobState, JobStatus

pytestmark = pytest.mark.dashboard
NOW = 1_800_000_000.0
CONFIG = {
    "experiment": {"name": "lr1"},
    "backend": {"args": {"train_iters": 100, "global_batch_size": 8, "seq_length": 128}},
    "slurm": {"nodes": 2, "gpus_per_node": 4},
}
COOLDOWNS = [{"name": "lr1_cooldown_20", "at": 20, "final_iteration": 30}]
EVALUATIONS = [
    {"iteration": 20, "suites": ["quick"], "cooldown": None},
    {"iteration": 30, "suites": ["quick"], "cooldown": 0},
]


def when(seconds: float) -> datetime:
    return datetime.fromtimestamp(NOW + seconds, UTC)


def whole_sweep(name: str, runs: dict[str, RunRecord | None], request: SweepRequest | None = None) -> SweepView:
    """A sweep page's view with every experiment's whole record at hand (the app reads light ones for the
    statuses, whole ones for the page), each run's live report made afresh."""
    page = sweep_page(name, runs, request or SweepRequest(), NOW)
    name_of = {s.dag_id: s.name for s in page.statuses}
    pks = {pk: dag_id for pk, dag_id in enumerate(runs) if runs[dag_id] is not None}
    records = {pk: runs[dag_id] for pk, dag_id in pks.items()}
    names = {pk: name_of[dag_id] for pk, dag_id in pks.items()}
    reports = LiveReports().reports(dict.fromkeys(pks, ()), names, lambda _: records)
    return sweep_view(page, runs, reports, NOW)


def sweep_html(view: SweepView, **common: object) -> str:
    from airflow_oellm.dashboard.app import sweep_drawing, templates

    return templates.get_template("sweep.html").render(**sweep_drawing(view, "/ui/oellm/sweeps/s"), **common)


def running_run() -> RunRecord:
    """Try 2 of the training runs (try 1 hit its time limit at 25); the cooldown and one evaluation are done."""
    first_try = {
        "try": 1,
        "job_id": "101",
        "submission": "submitted",
        "submitted_at": NOW - 7200,
        "end": when(-3600).isoformat(),
        "state": "TIMEOUT",
        "verdict": "retry",
        "reason": "time limit reached",
        "last_iteration": 25,
        "checkpoint_after": 20,
        "gpu_hours": 8.0,
        "loss_curve": [[10, 5.0], [20, 4.0], [25, 3.9]],
        "checkpoints_saved": [10, 20],
        "faults": [],
    }
    second_try = {"try": 2, "job_id": "102", "submission": "submitted", "submitted_at": NOW - 1800, "gpus": 8}
    progress = {
        "job_id": "102",
        "job_state": "RUNNING",
        "updated": NOW - 10,
        "summary": {
            "last_iteration": 40,
            "train_iters": 100,
            "last_loss": 3.5,
            "iteration_ms": 2000.0,
            "running_since": NOW - 1800,
            "loss_curve": [[21, 3.95], [30, 3.7], [40, 3.5]],
            "validation": [{"iteration": 40, "loss": 3.6, "split": "validation"}],
        },
    }
    cooldown_result = {
        "final_state": "COMPLETED",
        "summary": {"loss_curve": [[25, 3.8], [30, 3.6]], "last_iteration": 30},
        "attempts": [{"try": 1, "job_id": "201", "gpu_hours": 1.5, "end": when(-600).isoformat()}],
    }
    return RunRecord(
        dag_id="oellm__s__lr1",
        run_id="manual__1",
        state="running",
        tasks=[
            TaskRecord("prepare", -1, "success", 1, 0, when(-7300), when(-7250)),
            TaskRecord("train", -1, "deferred", 2, 1),
            TaskRecord("cooldown.train", 0, "success", 1, 1, when(-900), when(-600), "from 0"),
            TaskRecord("checkpoint.evaluate", 0, "success", 1, 1, when(-3000), when(-2900), "20"),
            TaskRecord("checkpoint.evaluate", 1, "success", 1, 1, when(-500), when(-400), "30"),
        ],
        xcoms={
            ("prepare", -1, "config"): CONFIG,
            ("prepare", -1, "cooldowns"): COOLDOWNS,
            ("prepare", -1, "return_value"): EVALUATIONS,
            ("prepare", -1, "planned_gpu_hours"): {
                "training": 48.0,
                "cooldowns": 12.0,
                "side_jobs": 2.0,
                "total": 62.0,
            },
            ("train", -1, "progress"): progress,
            ("cooldown.train", 0, "return_value"): cooldown_result,
            ("checkpoint.evaluate", 0, "return_value"): {"metrics": {"quick": {"perplexity": 50.0}}},
            ("checkpoint.evaluate", 1, "return_value"): {"metrics": {"quick": {"perplexity": 40.0}}},
        },
        histories={("train", -1): {"attempts": [first_try, second_try]}},
    )


def test_a_running_experiment_row():
    view = experiment_view("oellm__s__lr1", "lr1", running_run(), NOW)
    assert (view.state, view.attempt, view.max_attempts, view.job_state) == ("running", 2, 2, "RUNNING")
    assert (view.iteration, view.train_iters, view.fraction, view.loss) == (40, 100, 0.4, 3.5)
    assert view.eta_seconds == pytest.approx(60 * 2.0)  # 60 iterations left at 2 s each
    # finished attempts (8 + 1.5) plus half an hour so far on 2 nodes x 4 GPUs
    assert view.gpu_hours == pytest.approx(8.0 + 1.5 + 0.5 * 8)
    assert view.planned_gpu_hours == 62.0  # prepare's plan: every job at its limit, every attempt
    assert not view.stale
    # the main run's evaluation at 20; the cooldown's at 30 is not the experiment's "latest evaluation"
    assert (view.eval_name, view.eval_value, view.eval_iteration) == ("quick.perplexity", 50.0, 20)


def test_curves_join_attempts_and_branch_cooldowns_from_the_parent():
    view = experiment_view("oellm__s__lr1", "lr1", running_run(), NOW)
    main, cooldown = view.curves
    assert main.points == [(10, 5.0), (20, 4.0), (21, 3.95), (25, 3.9), (30, 3.7), (40, 3.5)]
    assert main.tokens_per_iteration == 8 * 128
    # the cooldown starts at the parent's loss at iteration 20
    assert cooldown.parent == "lr1" and cooldown.points == [(20.0, 4.0), (25, 3.8), (30, 3.6)]


def test_a_resume_overwrites_the_iterations_it_re_ran():
    assert merged_curve([[[10, 5.0], [15, 4.5]], [[11, 4.9], [15, 4.4]], None]) == [
        (10, 5.0),
        (11, 4.9),
        (15, 4.4),
    ]


def test_evaluation_table_per_run_and_checkpoint():
    view = experiment_view("oellm__s__lr1", "lr1", running_run(), NOW)
    rows = [(r["run"], r["iteration"], r["validation_loss"], r["metrics"]) for r in view.evaluations]
    assert rows == [
        ("lr1", 20, None, {"quick.perplexity": 50.0}),
        ("lr1", 40, 3.6, {}),
        ("lr1_cooldown_20", 30, None, {"quick.perplexity": 40.0}),
    ]


def test_timeline_has_submissions_retries_and_side_tasks_in_order():
    view = experiment_view("oellm__s__lr1", "lr1", running_run(), NOW)
    kinds = [(e.kind, e.text) for e in view.timeline]
    assert kinds[0] == ("submit", "training try 1: job 101 submitted")
    retry = next(text for kind, text in kinds if kind == "retry")
    assert "TIMEOUT at iteration 25 -> retry (time limit reached)" in retry
    assert ("submit", "training try 2: job 102 submitted") in kinds
    assert any(kind == "task" and text.startswith("checkpoint.evaluate[20] success") for kind, text in kinds)
    times = [e.time for e in view.timeline if e.time is not None]
    assert times == sorted(times)


def test_a_stale_progress_is_flagged():
    run = running_run()
    run.xcoms[("train", -1, "progress")]["updated"] = NOW - 3600
    assert experiment_view("d", "lr1", run, NOW).stale


def test_an_outage_in_the_progress_is_shown_on_the_row_with_its_advice():
    run = running_run()
    progress = run.xcoms[("train", -1, "progress")]
    progress["outage"] = Outage("lumi", 1_796_523_180.0, "cannot connect to lumi: Permission denied").to_dict(NOW)
    view = experiment_view("d", "lr1", run, NOW)
    assert view.outage == "cannot reach lumi since 2026-12-06 02:13 UTC: authentication failed"
    assert view.outage_advice.startswith("renew your SSH certificate or key")
    assert view.iteration == progress["summary"]["last_iteration"]  # the last known progress stays
    del progress["outage"]
    assert experiment_view("d", "lr1", run, NOW).outage is None


def finished_run() -> RunRecord:
    """running_run's training finished: its result returned, its progress left as it was."""
    run = running_run()
    run.tasks[1] = TaskRecord("train", -1, "success", 2, 1, when(-1800), when(-5))
    run.state = "success"
    run.xcoms[("train", -1, "return_value")] = {
        "final_state": "COMPLETED",
        "last_iteration": 100,
        "summary": {"last_iteration": 100, "train_iters": 100, "last_loss": 3.0, "loss_curve": [[100, 3.0]]},
    }
    return run


def test_a_finished_experiment_uses_its_result_not_the_last_progress():
    run = finished_run()
    view = experiment_view("d", "lr1", run, NOW)
    assert (view.iteration, view.loss, view.job_state, view.eta_seconds) == (100, 3.0, "COMPLETED", None)
    assert view.curves[0].points[-1] == (100, 3.0)
    # the running estimate stops with the task: only recorded attempts count
    assert view.gpu_hours == pytest.approx(9.5)


def test_sweep_counts_and_experiments_never_run():
    view = whole_sweep("s", {"oellm__s__lr1": running_run(), "oellm__s__lr2": None})
    assert [e.name for e in view.experiments] == ["lr1", "lr2"]
    assert view.counts == {"never run": 1, "running": 1}
    assert view.metric_columns == ["quick.perplexity"]


def test_a_retrying_training_shows_as_retrying():
    run = running_run()
    run.tasks[1] = TaskRecord("train", -1, "up_for_retry", 1, 1)
    assert experiment_view("d", "lr1", run, NOW).state == "retrying"


def test_progress_snapshot_is_bounded_and_marks_changes():
    watch = JobWatch([], WatchState("7", "/log"), inactivity_threshold=None, now=NOW)
    watch.state.summary["loss_curve"] = [[i, 1.0 / (i + 1)] for i in range(1000)]
    watch.state.summary["last_iteration"] = 999
    running = JobStatus(job_id="7", state=JobState.RUNNING)
    snapshot = watch.progress(running, NOW)
    assert len(snapshot["summary"]["loss_curve"]) == PROGRESS_CURVE
    assert snapshot["summary"]["loss_curve"][0] == [0, 1.0] and snapshot["summary"]["loss_curve"][-1][0] == 999
    mark = watch.progress_mark(running)
    watch.state.summary["last_iteration"] = 1000
    assert watch.progress_mark(running) != mark
    assert thinned([1, 2, 3], 5) == [1, 2, 3]


def test_svg_plot_has_one_polyline_per_series_and_escapes_labels():
    svg = line_plot(
        "loss",
        [Series("a<b", [(0, 5.0), (10, 4.0)], "#000"), Series("empty", [], "#111"), Series("c", [(5, 4.5)], "#222")],
        "iteration",
        "train loss",
    )
    assert svg.startswith('<svg id="loss"') and svg.endswith("</svg>")
    assert re.findall(r'data-series="([^"]*)"', svg) == ["a&lt;b", "c"]
    assert "no data yet" in line_plot("x", [], "i", "l")


def test_nice_ticks_cover_the_range():
    ticks = nice_ticks(3.2, 9.7)
    assert ticks[0] <= 3.2 and ticks[-1] >= 9.7 and len(ticks) <= 8
    assert nice_ticks(5.0, 5.0)[0] <= 5.0 <= nice_ticks(5.0, 5.0)[-1]


def test_a_queued_retry_does_not_show_its_predecessors_job_as_running():
    run = running_run()
    run.tasks[1] = TaskRecord("train", -1, "queued", 2, 1)
    attempts = run.histories[("train", -1)]["attempts"]
    attempts[1].update(end=when(-60).isoformat(), state="TIMEOUT", verdict="retry", reason="time limit")
    view = experiment_view("d", "lr1", run, NOW)
    assert view.job_state == "TIMEOUT" and view.eta_seconds is None
    assert view.gpu_hours == pytest.approx(9.5)  # no running estimate for an ended job


def test_the_pages_render_rows_plots_and_the_timeline():
    from airflow_oellm.dashboard.app import plots, templates

    view = whole_sweep("s", {"oellm__s__lr1": running_run(), "oellm__s__lr2": None})
    common = {"refresh": 20, "root": "/ui-root", "prefix": "/ui-root/oellm"}
    html = sweep_html(view, **common)
    assert html.count("<tr data-experiment=") == 2 and 'data-iteration="40"' in html
    assert "GPU-hours used / planned" in html and ">13.50 <" in html and "/ 62.0</span>" in html
    assert '<svg id="loss-vs-iteration"' in html and '<svg id="loss-vs-tokens"' in html
    assert 'href="/ui-root/dags/oellm__s__lr1/runs/manual__1/tasks/train"' in html
    assert '<meta http-equiv="refresh" content="20">' in html
    page = templates.get_template("experiment.html").render(
        e=view.experiments[0], sweep="s", runs=[], plots=plots(view.experiments[:1]), **common
    )
    assert page.count('<tr class="kind-') == len(view.experiments[0].timeline) > 3
    assert "quick.perplexity" in page


def test_the_report_and_the_dashboard_agree_on_a_run_that_retried():
    """Both read every attempt: rows, losses and validation of the first attempt stay after a retry."""
    from airflow_oellm.analysis.runs import run_curve as report_curve
    from airflow_oellm.analysis.runs import run_rows
    from airflow_oellm.dashboard.model import evaluations, run_curve

    first = {
        "try": 1,
        "job_id": "101",
        "end": when(-3600).isoformat(),
        "gpu_hours": 8.0,
        "loss_curve": [[10, 5.0], [20, 4.0], [25, 3.9]],
        "validation": [{"iteration": 10, "loss": 4.8}],  # written without a split: a validation point
        "checkpoints_saved": [10, 20],
    }
    last_summary = {
        "loss_curve": [[21, 3.95], [30, 3.7]],
        "validation": [
            {"iteration": 30, "loss": 3.6, "split": "validation"},
            {"iteration": 30, "loss": 9, "split": "test"},
        ],
        "checkpoints_saved": [30],
    }
    second = {"try": 2, "job_id": "102", "end": when(-60).isoformat(), "gpu_hours": 2.0, **last_summary}
    result = {"final_state": "COMPLETED", "summary": last_summary, "attempts": [first, second]}
    rows = {r["iteration"]: r for r in run_rows("lr1", result, [{"iteration": 20, "suites": []}], {})}
    assert sorted(rows) == [10, 20, 30]
    assert [rows[i]["train_loss"] for i in (10, 20, 30)] == [5.0, 4.0, 3.7]
    assert [rows[i]["validation_loss"] for i in (10, 20, 30)] == [4.8, None, 3.6]
    assert rows[10]["gpu_hours"] == 10.0 and rows[10]["attempts"] == 2
    run = RunRecord(
        dag_id="oellm__s__lr1",
        run_id="manual__1",
        state="success",
        tasks=[TaskRecord("prepare", -1, "success", 1, 0), TaskRecord("train", -1, "success", 2, 1)],
        xcoms={("prepare", -1, "config"): CONFIG, ("train", -1, "return_value"): result},
        histories={("train", -1): {"attempts": [first, second]}},
    )
    shown = {r["iteration"]: r["validation_loss"] for r in evaluations(run, "lr1")}
    assert shown == {i: rows[i]["validation_loss"] for i in (10, 30)}
    assert run_curve(run, "train") == report_curve(result)


def test_the_report_and_the_dashboard_agree_when_the_last_try_lost_the_cluster():
    """The failed try leaves the attempts so far as its result: the report counts the first try's
    hours, as the dashboard does from the history."""
    from airflow_oellm.analysis.runs import run_rows
    from airflow_oellm.monitor.accounting import used_gpu_hours_by_kind
    from airflow_oellm.monitor.attempts import lost_contact_result
    from airflow_oellm.monitor.records import AttemptHistory

    first = {
        "try": 1,
        "job_id": "101",
        "end": when(-3600).isoformat(),
        "gpu_hours": 8.0,
        "verdict": "retry",
        "checkpoints_saved": [10],
    }
    second = {"try": 2, "job_id": "101", "submission": "adopted"}  # followed until the cluster went away
    history = AttemptHistory.from_dict({"attempts": [first, second]})
    result = lost_contact_result(history, "lost contact with the cluster while following job 101: timed out")
    assert result["job_ids"] == ["101"] and "timed out" in result["lost_contact"]  # each job once
    run = RunRecord(
        dag_id="oellm__s__lr1",
        run_id="manual__1",
        state="failed",
        tasks=[TaskRecord("prepare", -1, "success", 1, 0), TaskRecord("train", -1, "failed", 2, 1)],
        xcoms={("prepare", -1, "config"): CONFIG, ("train", -1, "result"): result},
        histories={("train", -1): history.to_dict()},
    )
    dashboard = run_gpu_hours_so_far(run, CONFIG, NOW)
    assert dashboard == used_gpu_hours_by_kind({"training": [result]})["total"] == 8.0
    assert run_rows("lr1", result, [], {})[0]["gpu_hours"] == 8.0


def test_a_running_side_job_is_estimated_with_its_own_gpus():
    """An evaluation holds its own resources (one GPU here), not the training's eight."""
    run = running_run()
    run.tasks.append(TaskRecord("checkpoint.evaluate", 2, "deferred", 1, 1))
    run.xcoms[("checkpoint.evaluate", 2, "progress")] = {
        "job_id": "301",
        "job_state": "RUNNING",
        "updated": NOW - 10,
        "summary": {"running_since": NOW - 3600},
    }
    run.histories[("checkpoint.evaluate", 2)] = {"attempts": [{"try": 1, "job_id": "301", "gpus": 1}]}
    view = experiment_view("oellm__s__lr1", "lr1", run, NOW)
    assert view.gpu_hours == pytest.approx(8.0 + 1.5 + 0.5 * 8 + 1.0 * 1)


def test_a_rewound_run_draws_its_discarded_branch_greyed_with_a_rewind_mark_and_the_report_agrees():
    """Try 1 diverged at 51 and was rewound to 40; try 2 trained on from 40, skipping 50-71. The run's curve is
    try 1 up to 40 and try 2 after it; try 1's points after 40 are the discarded branch, apart and grey."""
    from airflow_oellm.analysis.runs import run_curve as report_curve
    from airflow_oellm.analysis.runs import run_rows
    from airflow_oellm.dashboard.app import plots
    from airflow_oellm.dashboard.model import evaluations, run_curve

    spiked_curve = [[i, 2.0 - i / 100] for i in range(1, 51)] + [[i, 6.0] for i in range(51, 92)]
    rewind = {"id": "rewind-1-job101", "anomaly": "loss_spike", "start": 51, "last_normal": 50, "detected_at": 71,
              "rewind_to": 40, "skipped": [50, 71], "discarded": [80]}  # fmt: skip
    first = {"try": 1, "job_id": "101", "end": when(-600).isoformat(), "verdict": "retry", "reason": "rewind: ...",
             "loss_curve": spiked_curve, "rewind": rewind,
             "validation": [{"iteration": 20, "loss": 1.9}, {"iteration": 80, "loss": 9.0}],
             "checkpoints_saved": [20, 40, 80]}  # fmt: skip
    final = [[i, 1.6 - i / 1000] for i in [*range(41, 50), *range(72, 121)]]
    second = {"try": 2, "job_id": "102", "end": when(-60).isoformat(), "verdict": "success", "loss_curve": final,
              "validation": [{"iteration": 100, "loss": 1.5}], "checkpoints_saved": [100, 120]}  # fmt: skip
    result = {"final_state": "COMPLETED", "job_ids": ["101", "102"], "summary": {"loss_curve": final},
              "attempts": [first, second]}  # fmt: skip
    run = RunRecord(
        dag_id="oellm__s__lr1",
        run_id="manual__1",
        state="success",
        tasks=[TaskRecord("prepare", -1, "success", 1, 0), TaskRecord("train", -1, "success", 2, 1)],
        # the progress XCom the rewound job left: its curve (with the spike) must not come back through it
        xcoms={
            ("prepare", -1, "config"): CONFIG,
            ("train", -1, "return_value"): result,
            ("train", -1, "progress"): {"job_id": "101", "summary": {"loss_curve": spiked_curve}},
        },
        histories={("train", -1): {"attempts": [first, second]}},
    )
    view = experiment_view("oellm__s__lr1", "lr1", run, NOW)
    main, lost = view.curves
    assert max(loss for _, loss in main.points) < 2.0  # no spike in the run's curve
    assert [x for x, _ in main.points] == [*range(1, 50), *range(72, 121)]
    assert lost.discarded and [x for x, _ in lost.points] == list(range(41, 92))
    assert main.marks == [(40.0, 1.6, "rewind-1-job101: loss spike at 51")]
    assert run_curve(run, "train") == report_curve(result) == main.points
    # the discarded branch's validation at 80 is shown nowhere (the rewound run never validated at 80)
    shown = {r["iteration"]: r["validation_loss"] for r in evaluations(run, "lr1") if r["validation_loss"]}
    assert shown == {20: 1.9, 100: 1.5}
    rows = run_rows("lr1", result, [], {})
    assert [r["iteration"] for r in rows] == [20, 40, 100, 120]  # no row for the discarded checkpoint 80
    assert {r["iteration"]: r["validation_loss"] for r in rows if r["validation_loss"]} == shown
    svg = plots([view])["iteration"]
    assert svg.count('data-discarded="true"') == 1 and 'data-series="lr1, discarded by rewind-1-job101"' in svg
    assert svg.count('<circle class="rewind" data-rewind="rewind-1-job101: loss spike at 51"') == 1


def test_a_rewind_with_a_margin_discards_what_earlier_attempts_trained_after_its_target():
    from airflow_oellm.monitor.records import AttemptHistory

    history = AttemptHistory.from_dict(
        {
            "attempts": [
                {"try": 1, "job_id": "1", "verdict": "retry", "loss_curve": [[100, 3.0], [200, 2.5], [300, 2.4]]},
                {
                    "try": 2,
                    "job_id": "2",
                    "verdict": "retry",
                    "loss_curve": [[310, 2.3], [350, 9.0]],
                    "rewind": {"id": "rewind-1-job2", "rewind_to": 200},
                },
                {"try": 3, "job_id": "3", "verdict": "success", "loss_curve": [[210, 2.45], [400, 2.2]]},
            ]
        }
    )
    kept, rewinds = history.rewound_curves()
    assert kept == [[[100, 3.0], [200, 2.5]], [], [[210, 2.45], [400, 2.2]]]
    assert [(r["id"], points) for r, points in rewinds] == [("rewind-1-job2", [[300, 2.4], [310, 2.3], [350, 9.0]])]


def finished_demo_runs(losses: dict[tuple[str, float], float], running: str | None = None) -> dict[str, RunRecord]:
    """The demo sweep's experiments (examples/demo, its real resolved configs), each run finished with a
    cooldown from 100 to 200 whose validation loss is `losses[(model, lr)]`; `running`: one whose training
    and cooldown have not returned yet."""
    from airflow_oellm.config import load_sweep
    from airflow_oellm.config.milestones import plan_runs
    from tests.conftest import REPO

    sweep = load_sweep(REPO / "examples" / "demo" / "demo.yaml")
    runs = {}
    for exp in sweep.experiments:
        config = exp.resolved
        cooldowns = plan_runs(config).milestones.cooldowns
        args = config["backend"]["args"]
        loss = losses[(exp.parameters["model"], args["lr"])]
        size = 1.5e-4 if exp.parameters["model"] == "tiny" else 3.8e-4  # the log's billions
        train = {"summary": {"checkpoints_saved": [100, 200], "loss_curve": [[100, 2 * loss], [200, 1.5 * loss]],
                             "validation": [{"iteration": 200, "loss": 1.6 * loss}], "parameters_billions": size},
                 "attempts": []}  # fmt: skip
        cooled = {"summary": {"checkpoints_saved": [200], "loss_curve": [[200, 1.1 * loss]],
                              "validation": [{"iteration": 200, "loss": loss}]}, "attempts": []}  # fmt: skip
        xcoms = {("prepare", -1, "config"): config, ("prepare", -1, "cooldowns"): cooldowns}
        if exp.name != running:
            xcoms |= {("train", -1, "return_value"): train, ("cooldown.train", 0, "return_value"): cooled}
        runs[exp.dag_id] = RunRecord(exp.dag_id, "manual__1", "running" if exp.name == running else "success",
                                     xcoms=xcoms)  # fmt: skip
    return runs


def test_the_sweep_page_analyses_the_finished_cooldowns_live():
    losses = {("tiny", 3e-3): 0.33, ("tiny", 1e-2): 0.31, ("tiny-wide", 3e-3): 0.29, ("tiny-wide", 1e-2): 0.30}
    view = whole_sweep("demo", finished_demo_runs(losses, running="tiny-wide_lr0.01"))
    analysis = view.analysis
    assert analysis["loss"] == "validation_loss" and analysis["losses_used"] == ["cooldown"]
    # each experiment's cooldown at 200 iterations of 8 x 64 tokens, N from the log
    assert sorted((m["experiment"], m["parameters"], m["tokens"]) for m in analysis["measurements"]) == [
        ("tiny-wide_lr0.003", 380_000, 102_400), ("tiny_lr0.003", 150_000, 102_400), ("tiny_lr0.01", 150_000, 102_400)
    ]  # fmt: skip
    assert analysis["left_out"] == {"tiny-wide_lr0.01": "no checkpoint of it has been measured yet"}
    best = analysis["best"]["lr"]
    assert best["1.5e+05"]["value"] == 0.01 and "2 or more values of lr" in best["3.8e+05"]["why_not"]
    assert "3 model sizes" in analysis["loss_law"]["why_not"]
    # the running one finishes: its cooldown joins, and the page shows both sizes' best rates
    view = whole_sweep("demo", finished_demo_runs(losses))
    assert view.analysis["best"]["lr"]["3.8e+05"]["value"] == 0.003
    common = {"refresh": None, "root": "/ui", "prefix": "/ui/oellm"}
    html = sweep_html(view, **common)
    assert re.findall(r'<tr data-size="([^"]+)" data-best="([^"]+)">', html) == [("1.5e+05", "0.01"),
                                                                             ("3.8e+05", "0.003")]  # fmt: skip
    assert '<svg id="loss-vs-compute"' in html and '<svg id="lr-sensitivity"' in html
    assert re.findall(r'id="lr-sensitivity".*?</svg>', html, re.S)[0].count("<polyline") == 2
    assert "L(N, D) not fitted: a fit of L(N, D) needs at least 3 model sizes (N), there are 2" in html


def test_a_point_the_sweep_stopped_early_shows_as_such_with_its_reason():
    from airflow_oellm.dashboard.app import templates

    run = running_run()
    reason = "stopped early: rank 2/2 at 40 (loss 3.9 vs best 3.5)"
    run.tasks[1] = TaskRecord("train", -1, "skipped", 1, 1)
    run.xcoms[("train", -1, "result")] = {"classification": {"verdict": "stopped", "reason": reason}, "attempts": []}
    view = experiment_view("d", "lr1", run, NOW)
    assert (view.state, view.stopped_early) == ("stopped early", reason)
    html = templates.get_template("macros.html").module.status_cells(view)
    assert "state-stopped-early" in html and reason in html


def test_a_pending_job_shows_its_reason_and_expected_start_and_the_eta_includes_the_wait():
    from airflow_oellm.dashboard.app import _start
    from airflow_oellm.slurm.pending import queue_state

    run = running_run()
    progress = run.xcoms[("train", -1, "progress")]
    progress["job_state"] = "PENDING"  # try 2's job waits in the queue, a resumed training: its pace is known
    progress["queue"] = queue_state("Priority", NOW + 3 * 3600).to_dict()
    other = running_run()
    other.xcoms[("train", -1, "progress")] |= {
        "job_state": "PENDING",
        "queue": queue_state("QOSMaxWallDurationPerJobLimit").to_dict(),
    }
    view = whole_sweep("s", {"oellm__s__lr1": run, "oellm__s__lr2": other, "oellm__s__lr3": None})
    waiting, stuck = view.experiments[:2]
    assert waiting.queue["reason"] == "Priority" and waiting.queue["expected_start"] == NOW + 3 * 3600
    assert waiting.eta_seconds == pytest.approx(3 * 3600 + 60 * 2.0)  # the wait, then 60 iterations at 2 s
    assert stuck.queue["clears"] is False and stuck.eta_seconds is None  # no estimate: no ETA
    assert view.pending == {"Priority": 1, "QOSMaxWallDurationPerJobLimit": 1}
    html = sweep_html(view, refresh=20, root="/r", prefix="/r/oellm")
    start = _start(NOW + 3 * 3600)
    assert _start(NOW + 3 * 3600, now=NOW) == "Fri 11:00 UTC"  # within the week: the day and the time
    assert _start(NOW + 8 * 86400, now=NOW) == "Sat 2027-01-23 08:00 UTC"
    epoch = NOW + 3 * 3600
    assert f'pending: Priority, expected start <span class="expected-start" data-epoch="{epoch}">{start}' in html
    assert "will not start as submitted: the job&#39;s size or time is outside" in html
    assert '<span data-reason="Priority">Priority 1</span>' in html
    assert waiting.job_state == "PENDING"
    run.xcoms[("train", -1, "progress")]["job_state"] = "RUNNING"
    assert experiment_view("d", "lr1", run, NOW).queue is None  # started: no queue line


def test_the_experiment_page_shows_the_running_jobs_last_log_lines_from_its_progress():
    from airflow_oellm.dashboard.app import plots, templates

    watch = JobWatch([], WatchState("7", "/log"), inactivity_threshold=None, now=NOW)
    lines = [f"line {i} <tag> & {'x' * 500}" for i in range(100)]
    data = ("\n".join(lines) + "\n").encode()
    watch.apply(NOW, JobStatus("7", JobState.RUNNING), FileChunk("/log", 0, len(data), data))
    progress = watch.progress(JobStatus("7", JobState.RUNNING), NOW)
    assert len(progress["log_tail"]) == 40 and progress["log_tail"][-1] == lines[-1][:400]  # bounded both ways
    assert watch.lines_read == 100
    run = running_run()
    run.xcoms[("train", -1, "progress")]["log_tail"] = progress["log_tail"]
    view = experiment_view("d", "lr1", run, NOW)
    assert view.log_tail == progress["log_tail"] and view.log_job == "102"
    page = templates.get_template("experiment.html").render(
        e=view, sweep="s", runs=[], plots=plots([view]), refresh=20, root="/r", prefix="/r/oellm"
    )
    assert 'id="log-tail"' in page and "line 99 &lt;tag&gt; &amp; xxx" in page and "line 59 " not in page
    run.tasks[1] = TaskRecord("train", -1, "success", 2, 1, when(-1800), when(-5))
    assert experiment_view("d", "lr1", run, NOW).log_tail == []  # the job ended: the task log has it all


def test_the_experiment_page_shows_each_tries_job_script_and_how_the_config_differs():
    from airflow_oellm.dashboard.app import plots, templates

    run = running_run()
    first = "#!/bin/bash\n#SBATCH --job-name=lr1\n#SBATCH --time=01:00:00\nsrun train.py --lr 0.1\n"
    second = first.replace("srun train.py", "#SBATCH --exclude=nid007\nsrun train.py")
    run.scripts = {("train", -1, 1): first, ("train", -1, 2): second, ("cooldown.train", 0, 1): "#!/bin/bash\nx\n"}
    run.xcoms[("prepare", -1, "config_diff")] = {
        "sweep": [
            {"key": "backend.args.lr", "value": 0.1, "others": [0.01, 0.001], "more": 2},
            {"key": "backend.args.lr_wsd_decay_iters", "unset": True, "others": [2000], "more": 0},
            {"key": "vars.tag", "value": "<b>", "others": [], "more": 0, "unset_elsewhere": 3},
        ],
        "run": [{"key": "backend.args.train_iters", "experiment": 100, "run": 120}],
    }
    view = experiment_view("d", "lr1", run, NOW)
    training = [s for s in view.scripts if s.label.startswith("training")]
    assert [(s.label, s.job_id, s.previous) for s in training] == [
        ("training try 1", "101", None),
        ("training try 2", "102", 1),
    ]
    assert training[0].changes == [] and "+#SBATCH --exclude=nid007" in training[1].changes
    assert [s.label for s in view.scripts][2:] == ["cooldown lr1_cooldown_20 try 1"]
    page = templates.get_template("experiment.html").render(
        e=view, sweep="s", runs=[], plots=plots([view]), refresh=20, root="/r", prefix="/r/oellm"
    )
    assert "training try 2: job 102 · changed since try 1" in page
    assert '<pre class="log diff">--- try 1\n+++ try 2\n' in page and "+#SBATCH --exclude=nid007" in page
    assert '<tr data-key="backend.args.lr"><td><code>backend.args.lr</code></td><td><code>0.1</code></td>' in page
    assert "<code>0.01</code>, <code>0.001</code> and 2 more" in page
    assert '<span class="muted">unset</span></td><td><code>2000</code>' in page
    assert "<code>&#34;&lt;b&gt;&#34;</code>" in page and "unset in 3" in page  # escaped, as JSON
    assert '<table id="config-run"' in page and "<td><code>100</code></td><td><code>120</code></td>" in page
    sweep_row = experiment_view("d", "lr1", running_run(), NOW)  # the sweep page's records have neither
    assert sweep_row.scripts == [] and sweep_row.config_diff is None


@settings(max_examples=300, deadline=None)
@given(
    heights=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=400),
    limit=st.integers(min_value=2, max_value=120),
)
def test_a_downsampled_curve_keeps_its_ends_and_extremes_within_the_limit(heights, limit):
    points = [(float(i), y) for i, y in enumerate(heights)]
    kept = downsampled(points, limit)
    assert len(kept) <= limit
    assert kept == [p for p in points if p in kept]  # a subset, in order (each x once)
    if points:
        assert kept[0] == points[0] and kept[-1] == points[-1]
    if len(points) <= limit:
        assert kept == points
    elif limit >= 4:  # each stretch keeps its lowest and highest: so does the curve
        finite = [y for _, y in points if math.isfinite(y)]
        if finite:
            assert min(finite) in [y for _, y in kept]
        if len(finite) == len(points):
            assert max(finite) in [y for _, y in kept]


def test_a_spike_survives_downsampling_where_even_spacing_would_miss_it():
    points = [(i, 3.0 - i / 1000) for i in range(1000)]
    points[503] = (503, 9.0)
    assert (503, 9.0) in downsampled(points, 100)
    assert (503, 9.0) not in thinned(points, 100)
    with pytest.raises(ValueError):
        downsampled(points, 1)


def light(run: RunRecord) -> RunRecord:
    """What queries.run_statuses reads of a whole record: the training's task and its XComs' STATUS_FIELDS."""
    from airflow_oellm.dashboard.queries import STATUS_FIELDS, _nested

    def at(value, path):
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return value

    xcoms = {
        (task_id, -1, key): _nested([(path, at(run.xcom(task_id, key), path)) for path in paths])
        for (task_id, key), paths in STATUS_FIELDS.items()
        if run.xcom(task_id, key) is not None
    }
    trains = [t for t in run.tasks if (t.task_id, t.map_index) == ("train", -1)]
    return RunRecord(run.dag_id, run.run_id, run.state, tasks=trains, xcoms=xcoms)


def variants() -> dict[str, RunRecord]:
    """A run in each situation a row's status tells apart."""
    from airflow_oellm.slurm.pending import queue_state

    pending, retrying, stopped = running_run(), running_run(), running_run()
    pending.xcoms[("train", -1, "progress")] |= {"job_state": "PENDING", "queue": queue_state("Priority").to_dict()}
    retrying.tasks[1] = TaskRecord("train", -1, "up_for_retry", 1, 1)
    stopped.tasks[1] = TaskRecord("train", -1, "skipped", 1, 1)
    stopped.xcoms[("train", -1, "result")] = {"classification": {"verdict": "stopped", "reason": "rank 2/2"}}
    situations = {"running": running_run(), "pending": pending, "finished": finished_run()}
    return situations | {"retrying": retrying, "stopped": stopped}


@pytest.mark.parametrize("situation", ["running", "pending", "finished", "retrying", "stopped"])
def test_a_rows_status_from_its_light_record_is_the_whole_rows(situation):
    whole = variants()[situation]
    full, status = experiment_view("d", "x", whole, NOW), experiment_status("d", "x", light(whole), NOW)
    fields = ("name", "state", "attempt", "max_attempts", "job_state", "iteration", "train_iters", "loss", "queue")
    assert [getattr(status, f) for f in fields] == [getattr(full, f) for f in fields]
    assert status.stopped_early == full.stopped_early and status.fraction == full.fraction
    assert status.curves == [] and status.timeline == []  # and nothing the light record cannot hold


def named(name: str, state: str = "running", loss: float | None = None, iteration: int | None = None) -> ExperimentView:
    return ExperimentView(f"oellm__s__{name}", name, state, loss=loss, iteration=iteration, train_iters=100)


def test_experiments_sort_by_name_state_loss_and_progress_with_the_unknown_last_either_way():
    views = [
        named("e10", "success", 2.5, 100),
        named("e2", "failed", 3.5, 40),
        named("e1", "running", None, None),
        named("e3", "running", float("nan"), 60),
        named("e20", "never run"),
        named("e4", "retrying", 2.5, 70),
    ]

    def order(sort):
        return [v.name for v in sorted_experiments(views, sort)]

    assert order("name") == ["e1", "e2", "e3", "e4", "e10", "e20"]  # numbers as numbers
    assert order("-name") == ["e20", "e10", "e4", "e3", "e2", "e1"]
    assert order("state") == ["e2", "e4", "e1", "e3", "e10", "e20"]  # failed first, never run last
    # a NaN loss is no loss to sort by; equal losses in name order whichever the direction
    assert order("loss") == ["e4", "e10", "e2", "e1", "e3", "e20"]
    assert order("-loss") == ["e2", "e4", "e10", "e1", "e3", "e20"]
    assert order("-progress") == ["e10", "e4", "e3", "e2", "e1", "e20"]
    with pytest.raises(ValueError, match="sort by one of name, state, loss, progress"):
        sorted_experiments(views, "gpu_hours")


def demo_runs(count: int) -> dict[str, RunRecord | None]:
    """`count` experiments lr0..: a running run each (the last never run), their losses falling with the index."""
    runs: dict[str, RunRecord | None] = {}
    for index in range(count):
        run = running_run()
        run.dag_id = f"oellm__s__lr{index}"
        run.xcoms[("prepare", -1, "config")] = {**CONFIG, "experiment": {"name": f"lr{index}"}}
        run.xcoms[("train", -1, "progress")]["summary"]["last_loss"] = 5.0 - index / 10
        runs[run.dag_id] = run if index < count - 1 else None
    return runs


def test_a_sweep_page_shows_its_rows_and_draws_the_selected_experiments_from_any_page():
    runs = demo_runs(5)
    view = whole_sweep("s", runs, SweepRequest(sort="-loss", page=2, per_page=2, selected=("oellm__s__lr0",)))
    page = view.page
    assert (page.total, page.pages, page.first, page.request.page) == (5, 3, 2, 2)
    assert [e.name for e in view.statuses] == ["lr0", "lr1", "lr2", "lr3", "lr4"]  # lr4 never ran: no loss, last
    assert [e.name for e in view.experiments] == ["lr2", "lr3"]
    assert [e.name for e in view.drawn] == ["lr0"] and view.counts == {"never run": 1, "running": 4}
    assert [len(c.points) for c in view.drawn[0].curves] == [6, 3]  # whole records of what it shows
    assert page.wanted == ["oellm__s__lr2", "oellm__s__lr3", "oellm__s__lr0"]
    html = sweep_html(view, refresh=None, root="/ui", prefix="/ui/oellm")
    assert re.findall(r'<tr data-experiment="([^"]+)"', html) == ["lr2", "lr3"]
    drawn = re.search(r'id="loss-vs-iteration".*?</svg>', html, re.S)[0]
    assert re.findall(r'data-series="([^"]+)"', drawn) == ["lr0", "lr1_cooldown_20"]  # its cooldown, as COOLDOWNS
    assert 'id="pager" data-page="2" data-pages="3" data-total="5"' in html and "3\u20134 of 5" in html
    sort, chosen = "/ui/oellm/sweeps/s?sort=-loss", "selected=oellm__s__lr0"
    assert f'<a rel="prev" href="{sort}&amp;per_page=2&amp;{chosen}">' in html
    assert f'<a rel="next" href="{sort}&amp;page=3&amp;per_page=2&amp;{chosen}">' in html
    toggled = f"{sort}&amp;page=2&amp;per_page=2&amp;{chosen}&amp;selected=oellm__s__lr2"
    assert f'data-select="oellm__s__lr2" href="{toggled}"' in html
    flipped = f"/ui/oellm/sweeps/s?sort=loss&amp;per_page=2&amp;{chosen}"  # ascending, from page 1
    assert f'data-sort="loss" href="{flipped}">train loss</a> ▼' in html
    assert '<svg id="loss-distribution"' in html and '<svg id="progress-distribution"' in html
    # a page past the last shows the last; the selection keeps only the sweep's experiments, each once
    request = SweepRequest(page=9, per_page=2, selected=("oellm__s__lr1", "nope", "oellm__s__lr1"))
    last = sweep_page("s", runs, request, NOW)
    assert (last.request.page, last.rows, last.request.selected) == (3, ["oellm__s__lr4"], ("oellm__s__lr1",))


def test_the_sweep_pages_links_keep_the_rest_of_the_request():
    from airflow_oellm.dashboard.app import SweepLinks

    links = SweepLinks("/o/sweeps/s", SweepRequest(sort="loss", page=3, per_page=20, selected=("a",)))
    assert links.sort("loss") == "/o/sweeps/s?sort=-loss&per_page=20&selected=a"  # flipped, from page 1
    assert links.sort("state") == "/o/sweeps/s?sort=state&per_page=20&selected=a"
    assert links.page(4) == "/o/sweeps/s?sort=loss&page=4&per_page=20&selected=a"
    assert links.toggle("b").endswith("&selected=a&selected=b") and "selected" not in links.toggle("a")
    assert links.clear() == "/o/sweeps/s?sort=loss&page=3&per_page=20"
    assert links.per_page(50) == "/o/sweeps/s?sort=loss&selected=a"  # the first row, 41, is on page 1 of 50
    assert links.per_page(10) == "/o/sweeps/s?sort=loss&page=5&per_page=10&selected=a"
    assert (links.arrow("loss"), links.arrow("state")) == (" ▲", "")


def test_the_distributions_count_every_experiments_loss_and_progress_per_state():
    views = [named(f"e{i}", "running", 2.0 + i / 10, 10 * i) for i in range(10)]
    views += [named("done", "success", 2.0, 100), named("bad", "failed", float("inf"), 30), named("new", "queued")]
    spread = distributions(views)
    loss, progress = spread["loss"], spread["progress"]
    assert len(loss["edges"]) == 21 and loss["edges"][0] == 2.0 and loss["edges"][-1] == pytest.approx(2.9)
    assert sum(loss["counts"]["running"]) == 10 and loss["counts"]["success"][0] == 1
    assert "failed" not in loss["counts"] and "queued" not in loss["counts"]  # no loss to count
    assert progress["edges"] == [10.0 * i for i in range(11)]
    assert progress["counts"]["running"] == [1] * 10 and progress["counts"]["success"][-1] == 1
    assert progress["counts"]["failed"][3] == 1 and list(progress["counts"]) == ["failed", "running", "success"]
    assert histogram([0.0, 1.0, 2.0, 5.0], [0.0, 1.0, 2.0]) == [1, 2]  # the last bin holds its upper edge
    assert distributions([named("one", "running", 3.0, 5)])["loss"]["edges"] == [2.5, 3.5]
    assert step_points([0.0, 1.0, 2.0], [3, 1]) == [(0.0, 0), (0.0, 3), (1.0, 3), (1.0, 1), (2.0, 1), (2.0, 0)]


def test_live_reports_are_made_once_per_version_of_their_xcoms():
    runs = demo_runs(3)
    loads = []

    def load(pks):
        loads.append(sorted(pks))
        return {pk: runs[f"oellm__s__lr{pk}"] for pk in pks}

    reports = LiveReports(kept=2)
    names = {0: "lr0", 1: "lr1"}
    first = reports.reports({0: ("v1",), 1: ("v1",)}, names, load)
    assert reports.reports({0: ("v1",), 1: ("v1",)}, names, load) == first
    assert [r["experiment"] for r in first] == ["lr0", "lr1"] and loads == [[0, 1]]
    reports.reports({0: ("v1",), 1: ("v2",)}, names, load)  # run 1's result changed
    assert loads == [[0, 1], [1]]
    reports.reports({0: ("v1",), 2: ("v1",)}, {0: "lr0", 2: "lr2"}, load)  # kept 2: run 1's goes
    reports.reports({1: ("v2",)}, names, load)
    assert loads == [[0, 1], [1], [2], [1]]
