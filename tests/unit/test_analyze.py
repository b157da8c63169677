"""`airflow-oellm analyze SWEEP_OUTPUT_DIR` on experiment reports as the report task writes them (synthetic
losses from a known law), and the report readers fuzzed: any JSON gives an analysis or a reason, never a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.analysis.measurements import COOLDOWN
from airflow_oellm.analysis.render import markdown
from airflow_oellm.analysis.sweep import analyse_reports
from airflow_oellm.cli import main
from tests.unit.test_scaling import SIZES, TOKENS, true_loss
from tests.unit.test_sweep_analysis import LRS, lr_penalty

pytestmark = [pytest.mark.unit, pytest.mark.analysis]


def write_sweep(root: Path, sizes: tuple[float, ...], sweep: str = "ladder", seed: int = 3) -> None:
    """One report per (size, lr), with a cooldown at each of three lengths, as report.json files."""
    rng = np.random.default_rng(seed)
    for n in sizes:
        for lr in LRS:
            name = f"n{n:g}_lr{lr:g}"
            rows = []
            for d in TOKENS[:3]:
                loss = true_loss(n, d) * lr_penalty(lr, n) * math.exp(rng.normal(0, 0.002))
                rows.append({"run": name, "iteration": int(d / 1e6), "train_loss": loss * 1.2,
                             "validation_loss": loss * 1.3, "parameters": n, "tokens": d, "flops": 6 * n * d,
                             "comparable": None})  # fmt: skip
                rows.append({"run": f"{name}_cooldown_{int(d / 1e6)}", "iteration": int(d / 1e6) + 100,
                             "train_loss": loss * 1.01, "validation_loss": loss, "parameters": n, "tokens": d,
                             "flops": 6 * n * d, "comparable": COOLDOWN})  # fmt: skip
            report = {"experiment": name, "sweep": sweep, "settings": {"lr": lr, "global_batch_size": 256},
                      "rows": rows}  # fmt: skip
            (root / name / "report").mkdir(parents=True)
            (root / name / "report" / "report.json").write_text(json.dumps(report))


def test_analyze_fits_a_sweep_of_three_sizes_and_writes_the_report_and_plots(tmp_path, capsys):
    write_sweep(tmp_path, SIZES[:3])
    (tmp_path / "broken" / "report").mkdir(parents=True)
    (tmp_path / "broken" / "report" / "report.json").write_text("{not json")
    assert main(["analyze", str(tmp_path), "--bootstrap", "20"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {tmp_path}/broken/report/report.json: not read" in err
    written = tmp_path / "_analysis" / "ladder"
    analysis = json.loads((written / "analysis.json").read_text())
    assert analysis["loss"] == "validation_loss" and analysis["losses_used"] == [COOLDOWN]
    assert len(analysis["measurements"]) == 27 and analysis["left_out"] == {}
    # the law's exponents near the true ones (0.34, 0.28) and predictions with intervals
    law = analysis["loss_law"]
    assert 0.2 < law["parameters"]["alpha"] < 0.5 and 0.2 < law["parameters"]["beta"] < 0.4, law
    first = law["compute_optimal"][0]
    largest = max(6 * n * d for n in SIZES[:3] for d in TOKENS[:3])
    assert first["flops"] == pytest.approx(10 * largest)
    assert first["parameters_interval"][0] <= first["parameters"] <= first["parameters_interval"][1]
    for n in SIZES[:3]:
        want = min(LRS, key=lambda lr: lr_penalty(lr, n))
        assert analysis["best"]["lr"][f"{n:.4g}"]["value"] == want
    assert analysis["best_lr_law"]["exponent"] < 0
    for name in ("loss_vs_compute", "lr_sensitivity", "loss_law"):
        assert (written / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert b"<svg" in (written / f"{name}.svg").read_bytes()
    text = (written / "analysis.md").read_text()
    assert text in out and f"written to {written}/" in out
    assert "The validation loss of the cooldowns' last checkpoints, 27 in all" in text
    assert "## Best lr per model size" in text and "## Scaling law" in text and "Not fitted" not in text.split("##")[3]
    # again, into another directory, as JSON
    assert main(["analyze", str(tmp_path), "--bootstrap", "5", "--json", "-o", str(tmp_path / "elsewhere")]) == 0
    assert json.loads(capsys.readouterr().out)["ladder"]["loss_law"]["runs"] == 27
    assert (tmp_path / "elsewhere" / "ladder" / "analysis.md").exists()


def test_two_sizes_are_analysed_with_the_reason_there_is_no_law(tmp_path, capsys):
    write_sweep(tmp_path, SIZES[:2], sweep="demo")
    assert main(["analyze", str(tmp_path), "--bootstrap", "5"]) == 0
    text = capsys.readouterr().out
    assert "Not fitted: a fit of L(N, D) needs at least 3 model sizes (N), there are 2" in text
    assert "Not fitted: a power law needs best learning rates at 3 or more distinct x; there are 2" in text
    assert "| 3e+07 | 1e+10 | 0.003 |" in text  # the best rate of the larger size, at its longest cooldown
    assert sorted(p.name for p in (tmp_path / "_analysis" / "demo").iterdir()) == [
        "analysis.json", "analysis.md", "loss_vs_compute.png", "loss_vs_compute.svg", "lr_sensitivity.png",
        "lr_sensitivity.svg",
    ]  # fmt: skip


def test_analyze_without_reports_says_so(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 1
    assert f"error: no experiment report (*/report/report.json) under {tmp_path}" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing")]) == 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NUMBER = st.one_of(st.none(), st.floats(), st.integers(-(10**12), 10**12), st.text(max_size=3))
ROW = st.fixed_dictionaries(
    {},
    optional={key: NUMBER for key in ("parameters", "tokens", "flops", "train_loss", "validation_loss", "iteration")}
    | {"comparable": st.sampled_from([None, "cooldown", "final", "other", 3]), "run": st.text(max_size=4)},
)
REPORT = st.fixed_dictionaries(
    {},
    optional={
        "experiment": st.text(max_size=4) | st.integers(),
        "settings": st.dictionaries(st.sampled_from(["lr", "global_batch_size"]), NUMBER) | JSON,
        "rows": st.lists(ROW | JSON, max_size=6) | JSON,
    },
)


@settings(max_examples=150, deadline=None)
@given(st.lists(REPORT | JSON, max_size=4))
def test_any_report_content_gives_an_analysis_and_a_report(reports):
    analysis = analyse_reports(reports, experiments=["x"], bootstrap=3)
    json.dumps(analysis)  # analysis.json can be written
    assert analysis["loss"] in ("validation_loss", "train_loss")
    for part in ("loss_law", "frontier", "best_lr_law"):
        assert analysis[part], part  # a result or its why_not
    assert markdown(analysis, "fuzzed").startswith("# Sweep analysis: fuzzed")
