"""`make demo`'s Airflow part (scripts/demo.py) on both batch systems: a real Airflow runs the example
sweep, and the demo checks its own report (losses fall, cooldowns end below their parents).
The install and the dev cluster, which scripts/demo.sh adds in front, are what CI has just done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.demo, pytest.mark.e2e, pytest.mark.slow]


def run_demo(batch_system: str, state_dir) -> str:
    env = {**os.environ, "OELLM_DEMO_DIR": str(state_dir), "OELLM_DEMO_PORT": "0"}
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW")}
    demo = [sys.executable, str(REPO / "scripts" / "demo.py"), "--batch-system", batch_system]
    try:
        done = subprocess.run([*demo, "--timeout", "1200"], env=env, capture_output=True, text=True, timeout=1500)
    finally:
        stopped = subprocess.run([*demo[:2], "--stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and not (state_dir / "pids").exists(), stopped.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def assert_demo_report(out: str) -> None:
    """The demo's own verdict, and the same facts read independently from the reports it points to."""
    assert "== sweep success" in out
    assert "checks: losses fall across checkpoints in every experiment; every cooldown ends below its parent; " in out
    assert "the analysis's best learning rate per size is the cooldowns' best" in out
    assert "Airflow UI: http://127.0.0.1:" in out and "(user admin, password " in out
    assert "sweep dashboard: http://127.0.0.1:" in out and "/oellm/sweeps/demo" in out
    plots = [Path(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("plot: ")]
    assert sorted(p.parts[-3] for p in plots) == [
        "tiny-wide_lr0.003",
        "tiny-wide_lr0.01",
        "tiny_lr0.003",
        "tiny_lr0.01",
    ]
    for plot in plots:
        assert plot.read_bytes().startswith(b"\x89PNG")
        name = plot.parts[-3]
        rows = {(r["run"], r["iteration"]): r for r in json.loads((plot.parent / "report.json").read_text())["rows"]}
        parent = [rows[(name, i)]["train_loss"] for i in (100, 200)]
        assert parent[0] > parent[1], (name, parent)
        for cooldown, at in ((f"{name}_cooldown_100", 200),):
            cooled, base = rows[(cooldown, at)], rows[(name, at)]
            assert cooled["validation_loss"] < base["validation_loss"], (cooldown, cooled, base)
            assert cooled["quick.perplexity"] < base["quick.perplexity"], (cooldown, cooled, base)
    # the demo ends with the sweep's analysis: read here from its files, beside the experiments' outputs
    analysis_dir = plots[0].parents[2] / "_analysis" / "demo"
    analysis = json.loads((analysis_dir / "analysis.json").read_text())
    assert "## Best lr per model size" in out and (analysis_dir / "lr_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert analysis["loss"] == "validation_loss" and analysis["losses_used"] == ["cooldown"]
    # the tiny trainer's two sizes (its log's counts) at 200 iterations of 8 x 64 tokens, two rates each
    sizes = sorted({(m["parameters"], m["tokens"], m["lr"]) for m in analysis["measurements"]})
    assert [s[1:] for s in sizes] == [(102400, 0.003), (102400, 0.01)] * 2, sizes
    assert 5e4 < sizes[0][0] < sizes[2][0] < 1e6, sizes
    assert all("value" in row for row in analysis["best"]["lr"].values()), analysis["best"]
    assert analysis["loss_law"]["why_not"].startswith("a fit of L(N, D) needs at least 3 model sizes (N), there are 2")


@pytest.mark.cluster
def test_demo_on_the_dev_cluster(dev_cluster, cluster_tools, tmp_path):
    assert_demo_report(run_demo("slurm", tmp_path))


def test_demo_falls_back_to_local_processes(tmp_path):
    out = run_demo("local-process", tmp_path)
    assert_demo_report(out)
    assert "jobs run on local processes (no SLURM)" in out
