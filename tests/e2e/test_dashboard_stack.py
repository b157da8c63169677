"""The dashboard plugin in a real Airflow stack (with real logins, not all-admins) on the dev cluster:
a sweep of two experiments with a cooldown each runs while headless Chromium reads the pages: the
iteration grows between two loads, and after the end every row, number, curve and evaluation is there.
One experiment trains on bad data at iterations 30-31: its loss spikes, it is rewound to checkpoint 20,
and its page shows the discarded branch greyed and the rewind's mark. Screenshots are saved under the
test's temp dir."""

from __future__ import annotations

import asyncio
import html
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_oellm.config import load_sweep
from airflow_oellm.config.milestones import COOLDOWN, typed_job
from airflow_oellm.config.tracking import tensorboard_url, wandb_run
from tests.browser import Browser
from tests.e2e.conftest import upload_fake_tools, wait
from tests.shared_stack import add_file

TRAIN_ITERS = 60
BAD = "30:32"  # fake_megatron: the data of iterations 30 and 31 damages the model
pytestmark = pytest.mark.dashboard

ROWS_JS = """Array.from(document.querySelectorAll('#experiments tr[data-experiment]')).map(r => ({
  name: r.dataset.experiment, state: r.dataset.state, iteration: r.dataset.iteration,
  cells: Array.from(r.cells).map(c => c.innerText.trim())}))"""
SERIES_JS = """Array.from(document.querySelectorAll('svg#loss-vs-iteration polyline')).map(p => ({
  series: p.dataset.series, points: p.getAttribute('points').trim().split(/\\s+/).length,
  discarded: p.dataset.discarded === 'true'}))"""
ANALYSIS_JS = """({
  best: Array.from(document.querySelectorAll('#best-lr tr[data-best]')).map(r => [r.dataset.size, r.dataset.best]),
  rate_points: Array.from(document.querySelectorAll('svg#lr-sensitivity polyline')).map(
    p => p.getAttribute('points').trim().split(/\\s+/).length),
  compute_series: document.querySelectorAll('svg#loss-vs-compute polyline').length,
  law: document.querySelector('#loss-law').innerText,
  note: document.querySelector('#analysis-note').innerText})"""
CONFIG_JS = """Array.from(document.querySelectorAll('#config-sweep tr[data-key]')).map(
  r => [r.dataset.key, r.cells[1].innerText.trim(), r.cells[2].innerText.trim()])"""
SCRIPTS_JS = """Array.from(document.querySelectorAll('#job-scripts details')).map(d => ({
  label: d.dataset.try, summary: d.querySelector('summary').innerText.trim(),
  script: d.querySelector('pre.script').textContent}))"""
REWINDS_JS = "Array.from(document.querySelectorAll('svg#loss-vs-iteration circle.rewind')).map(c => c.dataset.rewind)"
PAGER_JS = """(() => { const p = document.querySelector('#pager'); return {
  page: +p.dataset.page, pages: +p.dataset.pages, total: +p.dataset.total,
  previous: p.querySelector('a[rel=prev]')?.href ?? null, next: p.querySelector('a[rel=next]')?.href ?? null,
  drawn: document.querySelector('#drawn').innerText,
  select: Array.from(document.querySelectorAll('#experiments a.select')).map(a => a.href)}; })()"""


def sweep_yaml(remote: str, token: str, conn_id: str) -> str:
    return f"""
defaults: [{{platform: devcluster}}, {{model: tiny}}, _self_]
project: {{name: dash{token}, base_output_dir: {remote}/runs}}
platform: {{ssh_conn_id: {conn_id}}}
backend: {{python: python3, entrypoint: {remote}/fake_megatron.py, megatron_path: null,
  args: {{train_iters: {TRAIN_ITERS}, save_interval: 20, eval_interval: 20, iter_seconds: 0.5, seq_length: 128}}}}
monitoring: {{poll_interval_seconds: 2}}
restart: {{max_attempts: 2, retry_delay_seconds: 1}}
tracking: {{wandb: {{entity: lab}}, tensorboard: {{url: "https://tb.example.org/?logdir={{logdir}}"}}}}
conversion: {{command: [python3, {remote}/fake_tools.py, convert]}}
evaluation: {{command: [python3, {remote}/fake_tools.py, evaluate], suites: [{{name: quick}}]}}
cooldowns: [{{at: 20, overrides: [backend.args.min_lr=1.0e-6, backend.args.train_iters=30]}}]
sweep:
  name: dash{token}
  name_template: "lr{{lr}}"
  groups:
    - type: list
      configs:
        - {{backend.args.lr: 0.001}}
        # a loss spike, rewound: unrecovered at 50, the diverged job waits at 55 for its watch to kill it
        - {{backend.args.lr: 0.01, backend.args.fake_bad_iterations: "{BAD}", backend.args.fake_diverged_hold_at: 55}}
"""


@pytest.fixture(scope="module")
def stack(shared_stack, dev_cluster, module_remote_dir, slurm_conn_id):
    remote = module_remote_dir
    upload_fake_tools(dev_cluster, remote)
    token = uuid.uuid4().hex[:6]
    s = shared_stack  # real logins, logged in as admin (tests/shared_stack.py)
    s.sweep = load_sweep(add_file(s.sweeps, f"dash{token}.yaml", sweep_yaml(remote, token, slurm_conn_id)))
    ids = [e.dag_id for e in s.sweep.experiments] + [f"oellm__{s.sweep.name}"]
    wait(lambda: all(s.http("GET", f"/dags/{d}") for d in ids), 240, "the sweep's DAGs parsed", s)
    return s


def site(stack) -> str:
    return stack.base.removesuffix("/api/v2")


def fetch(url: str, token: str | None = None, accept: str = "application/json") -> tuple[int, str, str]:
    """(status, final URL, body) without following redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    headers = {"Accept": accept}
    if token:
        headers["Cookie"] = f"_token={token}"
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, response.url, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location") or "", exc.read().decode(errors="replace")


def test_pages_need_an_airflow_login(stack):
    status, _, _ = fetch(f"{site(stack)}/oellm/api/sweeps")
    assert status == 401
    status, location, _ = fetch(f"{site(stack)}/oellm/", accept="text/html")
    assert status in (302, 307) and "/auth/login" in location, (status, location)
    status, _, body = fetch(f"{site(stack)}/oellm/api/sweeps", token=stack.access_token)
    assert status == 200 and stack.sweep.name in body


def test_the_plugin_is_in_the_airflow_navigation(stack):
    plugins = stack.http("GET", "/plugins")["plugins"]
    views = [v for p in plugins if p["name"] == "oellm_dashboard" for v in p["external_views"]]
    assert {v["destination"] for v in views} == {"nav", "dag"}, views


def experiment_api(stack, dag_id: str) -> dict[str, Any]:
    status, _, body = fetch(f"{site(stack)}/oellm/api/experiments/{urllib.parse.quote(dag_id)}", stack.access_token)
    assert status == 200, body
    return json.loads(body)


async def read_sweep_page(browser: Browser, url: str, shot: Path) -> tuple[list[dict[str, Any]], list[Any], float]:
    started = time.monotonic()
    await browser.open(url)
    elapsed = time.monotonic() - started
    rows = await browser.evaluate(ROWS_JS)
    series = await browser.evaluate(SERIES_JS)
    await browser.screenshot(shot)
    return rows, series, elapsed


@pytest.fixture(scope="module")
def sweep_run(stack) -> str:
    """The sweep's run, triggered once for the tests below."""
    return stack.trigger(f"oellm__{stack.sweep.name}")


@pytest.fixture(scope="module")
def finished_sweep_run(stack, sweep_run) -> str:
    """The sweep's run once it ended (several minutes on a shared machine: a module fixture's wait)."""
    dag_id = f"oellm__{stack.sweep.name}"
    assert stack.wait_run(dag_id, sweep_run, 1500) == "success", stack.explain(dag_id, sweep_run)
    return sweep_run


def test_a_running_sweeps_page_shows_its_progress_growing(stack, sweep_run, tmp_path):
    sweep = stack.sweep
    dag_ids = [e.dag_id for e in sweep.experiments]
    url = f"{site(stack)}/oellm/sweeps/{sweep.name}"

    def training() -> bool:
        views = [experiment_api(stack, d) for d in dag_ids]
        return any(v["state"] == "running" and (v["iteration"] or 0) >= 5 for v in views)

    wait(training, 600, "an experiment training with progress recorded", stack, every=2)

    async def while_running() -> tuple[Any, Any]:
        async with Browser() as browser:
            await browser.login(site(stack), stack.access_token)
            first = await read_sweep_page(browser, url, tmp_path / "sweep_running_1.png")
            await asyncio.sleep(8)  # the training must move on between the two reads of the page
            second = await read_sweep_page(browser, url, tmp_path / "sweep_running_2.png")
            return first, second

    (rows1, _, _), (rows2, series2, elapsed) = asyncio.run(while_running())
    assert {r["name"] for r in rows1} == {e.name for e in sweep.experiments}, rows1
    before = {r["name"]: int(r["iteration"] or 0) for r in rows1}
    after = {r["name"]: int(r["iteration"] or 0) for r in rows2}
    assert any(after[n] > before[n] for n in before), (rows1, rows2)
    assert any(r["state"] == "running" for r in rows2), rows2
    assert series2, "the running sweep's loss plot has no curve"
    assert elapsed < 10, elapsed
    for shot in ("sweep_running_1", "sweep_running_2"):
        assert (tmp_path / f"{shot}.png").stat().st_size > 10_000


def test_a_finished_sweeps_final_comparison_and_each_experiments_page(stack, finished_sweep_run, tmp_path):
    sweep = stack.sweep
    url = f"{site(stack)}/oellm/sweeps/{sweep.name}"

    async def finished() -> tuple[Any, ...]:
        async with Browser() as browser:
            await browser.login(site(stack), stack.access_token)
            rows, series, _ = await read_sweep_page(browser, url, tmp_path / "sweep_final.png")
            evaluations = await browser.evaluate(
                "Array.from(document.querySelectorAll('#evaluations tr')).slice(1).map(r => "
                "Array.from(r.cells).map(c => c.innerText.trim()))"
            )
            tokens_plot = await browser.evaluate("document.querySelectorAll('svg#loss-vs-tokens polyline').length")
            analysis = await browser.evaluate(ANALYSIS_JS)
            rewinds = await browser.evaluate(REWINDS_JS)
            first = sweep.experiments[0]
            await browser.open(f"{site(stack)}/oellm/experiments/{first.dag_id}")
            timeline = await browser.evaluate(
                "Array.from(document.querySelectorAll('#timeline tr[data-kind]')).map(r => "
                "[r.dataset.kind, r.innerText])"
            )
            await browser.screenshot(tmp_path / "experiment_final.png")
            details = {}
            for e in sweep.experiments:
                await browser.open(f"{site(stack)}/oellm/experiments/{e.dag_id}")
                details[e.name] = (await browser.evaluate(CONFIG_JS), await browser.evaluate(SCRIPTS_JS))
            await browser.open(f"{site(stack)}/oellm/")
            counts = await browser.evaluate(
                f"document.querySelector('tr[data-sweep=\"{sweep.name}\"] .counts').innerText"
            )
            await browser.screenshot(tmp_path / "sweeps.png")
            # inside the Airflow UI: its navigation entry shows the dashboard in a frame
            await browser.open(f"{site(stack)}/plugin/oellm-sweeps")
            frame = None
            for _ in range(60):
                frame = await browser.evaluate("document.querySelector('iframe')?.src")
                if frame:
                    break
                await asyncio.sleep(0.5)  # poll
            await asyncio.sleep(3)  # the frame's own page
            await browser.screenshot(tmp_path / "airflow_ui_sweeps.png", full_page=False)
            return rows, series, evaluations, tokens_plot, rewinds, timeline, counts, frame, analysis, details

    rows, series, evaluations, tokens_plot, rewinds, timeline, counts, frame, analysis, details = asyncio.run(
        finished()
    )
    print("screenshots:", sorted(str(p) for p in tmp_path.glob("*.png")))
    assert all(r["state"] == "success" and int(r["iteration"]) == TRAIN_ITERS for r in rows), rows
    for row in rows:
        loss = float(row["cells"][4])
        assert 2.0 < loss < 12.5, row  # fake_megatron: 10 exp(-it/50) + 2 + 50 lr
        assert row["cells"][5].startswith("quick.") and f"@{TRAIN_ITERS}" in row["cells"][5], row
        # GPU-hours used / planned (prepare's plan; the dev cluster has no GPUs, so the plan is 0)
        used, planned = row["cells"][6].split(" / ")
        rewound = row["name"] == "lr0.01"  # its second attempt is the rewound training
        assert float(used) >= 0 and float(planned) == 0.0 and row["cells"][2] == ("2 / 2" if rewound else "1 / 2"), row
    names = {e.name for e in sweep.experiments}
    cooldowns = {f"{n}_cooldown_20" for n in names}
    discarded = [s for s in series if s["discarded"]]
    assert [s["series"].partition(", discarded by rewind-1-job")[0] for s in discarded] == ["lr0.01"], series
    assert {s["series"] for s in series if not s["discarded"]} == names | cooldowns, series
    assert all(s["points"] >= 2 for s in series), series
    job = discarded[0]["series"].rpartition("-job")[2]  # the rewound job's id
    assert rewinds == [f"rewind-1-job{job}: loss spike at 30"], rewinds  # a ring at checkpoint 20
    assert tokens_plot == len(series)
    by_run = {}
    for cells in evaluations:
        by_run.setdefault(cells[0], []).append(int(cells[1]))
    for name in names:
        # lr0.01's checkpoint 40 was saved during its spike: its branch waited, the rewind to 20 discarded it, and
        # the rewound run skipped 29-50, so 40 never came again: skipped, no row
        assert by_run[name] == ([20, 60] if name == "lr0.01" else [20, 40, 60]), by_run
    assert all(by_run[c] == [30] for c in cooldowns), by_run
    # the analysis panel: one model size (the tiny model's arguments), each rate's cooldown loss at 30 iterations
    # (fake_megatron's loss grows with the rate: 0.001 is best); one size and one length: no law, and why
    assert [row[1] for row in analysis["best"]] == ["0.001"], analysis
    assert analysis["rate_points"] == [2] and analysis["compute_series"] >= 2, analysis
    assert "3 model sizes" in analysis["law"] and " loss of cooldown (2 in all" in analysis["note"], analysis
    kinds = [k for k, _ in timeline]
    assert "submit" in kinds and "end" in kinds and "task" in kinds, timeline
    assert "success 2" in counts.replace("\n", " "), counts
    # what sets each experiment apart from the sweep's base, and the job script every try submitted
    config, scripts = details["lr0.001"]
    assert ["backend.args.lr", "0.001", "0.01"] in config, config
    assert ["backend.args.fake_bad_iterations", "unset", f'"{BAD}"'] in config, config
    assert [s["label"] for s in scripts] == ["training try 1", "cooldown lr0.001_cooldown_20 try 1"], scripts
    config, scripts = details["lr0.01"]
    assert ["backend.args.lr", "0.01", "0.001"] in config, config
    assert [s["label"] for s in scripts][:2] == ["training try 1", "training try 2"], scripts
    assert scripts[0]["summary"] == f"training try 1: job {job}", scripts  # the job the rewind stopped
    assert scripts[1]["summary"].startswith("training try 2: job "), scripts
    for s in scripts:
        assert s["script"].startswith("#!/bin/bash") and "#SBATCH --job-name=" in s["script"], s
    assert frame and frame.rstrip("/").endswith("/oellm"), frame
    for shot in (
        "sweep_final",
        "experiment_final",
        "sweeps",
        "airflow_ui_sweeps",
    ):
        assert (tmp_path / f"{shot}.png").stat().st_size > 10_000


COOLDOWN_JOB = {"kind": COOLDOWN, "cooldown": 0}


def test_each_trainings_wandb_and_tensorboard_links_on_its_task_its_row_and_its_page(stack, finished_sweep_run):
    """The links of each training and cooldown: Airflow's own extra links of the task (the UI's buttons, kept
    when the task process ended), the sweep page's row, the experiment page's table."""
    status, _, page = fetch(f"{site(stack)}/oellm/sweeps/{stack.sweep.name}", stack.access_token, "text/html")
    assert status == 200
    for e in stack.sweep.experiments:
        view = experiment_api(stack, e.dag_id)
        expected = []
        for task_id, cfg in (("train", e.config), ("cooldown.train", typed_job(e.runtime_config(), COOLDOWN_JOB))):
            run = wandb_run(cfg)
            assert run is not None and run.url == f"https://wandb.ai/lab/{cfg.project.name}/runs/{run.run_id}"
            tensorboard = tensorboard_url(cfg)
            assert tensorboard and tensorboard.startswith("https://tb.example.org/?logdir=%2F"), tensorboard
            expected.append({"run": cfg.experiment.name, "wandb": run.url, "tensorboard": tensorboard})
            map_index = -1 if task_id == "train" else 0
            links = stack.http(
                "GET",
                f"/dags/{e.dag_id}/dagRuns/{urllib.parse.quote(view['run_id'], safe='')}/taskInstances/"
                f"{task_id}/links?map_index={map_index}",
            )["extra_links"]
            assert links == {"TensorBoard": tensorboard, "W&B run": run.url}, links
        shown = [{k: t[k] for k in ("run", "wandb", "tensorboard")} for t in view["tracking"]]
        assert shown == expected, view["tracking"]
        assert f'href="{html.escape(expected[0]["wandb"])}"' in page  # the row's W&B link
        assert f'href="{html.escape(expected[0]["tensorboard"])}"' in page


def test_a_sweep_page_pages_its_rows_and_draws_a_selected_experiment_from_another_page(
    stack, finished_sweep_run, tmp_path
):
    """One row per page: the two experiments are on two pages, each page draws its own row's curves; an
    experiment selected on page 2 is drawn on page 1 instead of page 1's. The links are followed as a user
    clicks them; the JSON twin pages alike."""
    sweep = stack.sweep
    names = {e.name for e in sweep.experiments}

    async def page_through() -> list[tuple[Any, Any, Any]]:
        async with Browser() as browser:
            await browser.login(site(stack), stack.access_token)
            seen = []

            async def read(url: str) -> dict[str, Any]:
                await browser.open(url)
                pager = await browser.evaluate(PAGER_JS)
                seen.append((await browser.evaluate(ROWS_JS), await browser.evaluate(SERIES_JS), pager))
                return pager

            first = await read(f"{site(stack)}/oellm/sweeps/{sweep.name}?per_page=1")
            second = await read(first["next"])
            selected = await read(second["select"][0])  # page 2's experiment selected
            await read(selected["previous"])
            await browser.screenshot(tmp_path / "sweep_page_1_with_a_selection.png")
            return seen

    (rows1, series1, pager1), (rows2, series2, pager2), _, (rows3, series3, pager3) = asyncio.run(page_through())

    def drawn(series: list[dict[str, Any]]) -> set[str]:
        return {s["series"] for s in series if not s["discarded"]}

    assert (pager1["page"], pager1["pages"], pager1["total"], pager1["previous"]) == (1, 2, 2, None), pager1
    assert (pager2["page"], pager2["next"]) == (2, None), pager2
    assert len(rows1) == len(rows2) == 1 and {rows1[0]["name"], rows2[0]["name"]} == names, (rows1, rows2)
    one, two = rows1[0]["name"], rows2[0]["name"]
    assert drawn(series1) == {one, f"{one}_cooldown_20"}, series1
    assert drawn(series2) == {two, f"{two}_cooldown_20"}, series2
    # back on page 1, its row is there and the curves are the selected experiment's, from page 2
    assert [r["name"] for r in rows3] == [one] and pager3["page"] == 1, (rows3, pager3)
    assert drawn(series3) == drawn(series2) and f"1 selected experiment ({two})" in pager3["drawn"], pager3

    two_id = next(e.dag_id for e in sweep.experiments if e.name == two)
    query = urllib.parse.urlencode({"per_page": 1, "page": 2, "sort": "-name", "selected": two_id})
    status, _, body = fetch(f"{site(stack)}/oellm/api/sweeps/{sweep.name}?{query}", stack.access_token)
    assert status == 200, body
    answer = json.loads(body)
    assert {k: answer[k] for k in ("total", "page", "per_page", "pages", "sort", "selected")} == {
        "total": 2, "page": 2, "per_page": 1, "pages": 2, "sort": "-name", "selected": [two_id]
    }  # fmt: skip
    assert [e["name"] for e in answer["experiments"]] == [one]  # descending: page 1's is last
    assert [e["name"] for e in answer["selected_experiments"]] == [two]
    assert sum(answer["distributions"]["progress"]["counts"]["success"]) == 2, answer["distributions"]
    status, _, body = fetch(f"{site(stack)}/oellm/api/sweeps/{sweep.name}?per_page=0", stack.access_token)
    assert status == 422, body


QUEUE_JS = """Array.from(document.querySelectorAll('#experiments tr[data-experiment]')).map(r => ({
  name: r.dataset.experiment, queue: r.querySelector('.queue')?.innerText.trim() ?? null,
  epoch: r.querySelector('.queue .expected-start')?.dataset.epoch ?? null}))"""


@pytest.mark.queue
def test_a_job_held_in_the_queue_shows_its_reason_and_expected_start(stack, dev_cluster, module_remote_dir, tmp_path):
    """A training submitted with `--begin=now+1hour` pends (BeginTime) with an expected start an hour ahead:
    the experiment's row says so, the sweep page counts it, and its ETA waits for that start."""
    token = uuid.uuid4().hex[:6]
    text = f"""
defaults: [{{platform: devcluster}}, _self_]
project: {{name: queue{token}, base_output_dir: {module_remote_dir}/queued}}
platform: {{ssh_conn_id: {stack.sweep.experiments[0].config.platform.ssh_conn_id}}}
backend: {{name: command, launcher: none, command: [sleep, "1"]}}
slurm: {{directives: {{begin: now+1hour}}}}
monitoring: {{poll_interval_seconds: 2, start_estimate_interval_seconds: 5}}
restart: {{max_attempts: 1}}
"""
    queued = load_sweep(add_file(stack.sweeps, f"queue{token}.yaml", text))
    (e,) = queued.experiments
    wait(lambda: stack.http("GET", f"/dags/{e.dag_id}"), 240, "the queued sweep's DAG parsed", stack)
    submitted = time.time()
    run_id = stack.trigger(e.dag_id)

    def estimated() -> dict[str, Any] | None:
        queue = experiment_api(stack, e.dag_id).get("queue")
        return queue if queue and queue.get("expected_start") else None

    queue = wait(estimated, 240, "the held job's reason and expected start on the dashboard", stack, every=2)
    assert queue["reason"] == "BeginTime" and queue["category"] == "begin_time" and queue["clears"], queue
    assert submitted + 3600 - 60 < queue["expected_start"] < time.time() + 3600 + 60, (submitted, queue)

    async def read() -> tuple[Any, Any]:
        async with Browser() as browser:
            await browser.login(site(stack), stack.access_token)
            await browser.open(f"{site(stack)}/oellm/sweeps/{queued.name}")
            rows = await browser.evaluate(QUEUE_JS)
            pending = await browser.evaluate("document.querySelector('#pending')?.innerText ?? ''")
            await browser.screenshot(tmp_path / "sweep_pending.png")
            return rows, pending

    rows, pending = asyncio.run(read())
    assert rows[0]["queue"].startswith("pending: BeginTime, expected start "), rows
    assert float(rows[0]["epoch"]) == queue["expected_start"], rows
    assert "BeginTime 1" in pending, pending
    # done with it: its run ends, its job goes (that marking a task failed cancels its job is
    # tests/e2e/test_stack.py's, on a quiet machine: here the trigger's cancel can be cut short)
    q = urllib.parse.quote(run_id, safe="")
    stack.http("PATCH", f"/dags/{e.dag_id}/dagRuns/{q}/taskInstances/train", {"new_state": "failed"})
    dev_cluster.ssh(["scancel", f"--name={e.name}"])
