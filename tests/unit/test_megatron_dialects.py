"""Every Megatron-LM dialect a lab runs, from recorded logs rendered from each version's own format strings
(tests/fixtures/megatron_logs/, README there): the events, loss curve, validations and checkpoints the
watcher finds must be the ones the log holds (its JSON sidecar, written with the log, not by our code)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.megatron.logs import BUILTIN_EVENTS
from airflow_oellm.monitor.events import event_specs, match_log
from airflow_oellm.monitor.watch import empty_summary, summarize
from tests.seed_guide import GUIDE

pytestmark = pytest.mark.megatron

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "megatron_logs"
FIXTURES = sorted(p.stem for p in LOGS.glob("*.log"))


def facts(stem: str) -> dict:
    return json.loads((LOGS / f"{stem}.json").read_text())


def watched(stem: str) -> tuple[list, dict]:
    events = match_log((LOGS / f"{stem}.log").read_bytes(), event_specs())
    summary = empty_summary()
    for event in events:
        summarize(summary, event)
    return events, summary


def test_there_is_a_log_per_dialect():
    dialects = {facts(stem)["dialect"] for stem in FIXTURES}
    expected = {"v2.6", "core_v0.6.0", "core_v0.7.0", "core_v0.10.0", "core_v0.12.0", "core_v0.14.0"}
    expected |= {"core_v0.16.1", "core_v0.19.0", "bridge_v0.6.0", "megatron-deepspeed@f4157bea"}
    assert expected <= dialects, dialects


@pytest.mark.parametrize("stem", FIXTURES)
def test_the_watcher_reads_what_the_log_holds(stem):
    expected = facts(stem)
    events, summary = watched(stem)
    iterations = [e.groups for e in events if e.name == "iteration"]
    assert [g["iteration"] for g in iterations] == expected["iterations"]
    assert {g["train_iters"] for g in iterations} <= {expected["train_iters"]}
    for g, loss in zip(iterations, expected["losses"], strict=True):
        assert (g.get("loss") is None) == (loss is None), (g, loss)
        if loss is not None:
            assert g["loss"] == pytest.approx(loss, rel=1e-6)
    assert [g.get("nan_iterations", 0) for g in iterations] == expected["nan_iterations"]
    # the loss curve: every finite loss, in order
    curve = [(i, loss) for i, loss in zip(expected["iterations"], expected["losses"], strict=True) if loss is not None]
    assert [i for i, _ in summary["loss_curve"]] == [i for i, _ in curve]
    assert [loss for _, loss in summary["loss_curve"]] == pytest.approx([loss for _, loss in curve])
    saved = [e.groups for e in events if e.name == "checkpoint_saved"]
    assert [g["iteration"] for g in saved] == expected["checkpoints_saved"]
    assert [g["path"] for g in saved] == expected["checkpoint_dirs"]
    assert summary["resumed_from"] == (expected["resumed_from"] or 0)
    assert summary["training_done"] is expected["training_done"]
    validations = summary["validation"]
    assert len(validations) == len(expected["validation"])
    for got, want in zip(validations, expected["validation"], strict=True):
        # Megatron-LM 2.x names the end of training, not its iteration: the last one logged
        assert got["iteration"] == (want["iteration"] or expected["iterations"][-1])
        assert got["split"] == want["split"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)


def test_fields_beyond_the_known_ones_are_kept_by_name():
    events, _ = watched("core_v0.19.0")
    moe = [e.groups["load_balancing_loss"] for e in events if e.name == "iteration"]
    assert moe == pytest.approx(facts("core_v0.19.0")["load_balancing_losses"])
    deepspeed = next(e.groups for e in watched("megatron_deepspeed")[0] if e.name == "iteration")
    assert deepspeed["consumed_tokens"] == deepspeed["consumed_samples"] * 2048  # --seq-length 2048
    assert {"samples_per_second", "tokens_per_second_per_gpu", "tflops_per_gpu"} <= set(deepspeed)


def test_a_nan_loss_is_counted_in_a_row_of_log_intervals():
    _, summary = watched("core_v0.14.0_nan_intervals")
    assert summary["nan_intervals"] == 3  # 601-700 (24 NaN steps), 701-800 and 801-900 (all)
    _, clean = watched("core_v0.14.0")
    assert clean["nan_intervals"] == 0
    # bf16 does not skip a NaN step: the interval's loss is left out and its grad norm reads nan
    line = (
        " [2026-05-07 20:05:33] iteration      800/    1000 | consumed samples:       204800 | elapsed time per "
        "iteration (ms): 2310.4 | learning rate: 2.345000E-04 | global batch size:   256 | loss scale: 1.0 | "
        "grad norm: nan | number of skipped iterations:   0 | number of nan iterations:   0 |\n"
    )
    summary = empty_summary()
    for event in match_log(line.encode(), event_specs()):
        summarize(summary, event)
    assert summary["nan_intervals"] == 1 and summary["last_loss"] is None


def test_async_saves_are_scheduled_first_and_counted_when_done():
    events, summary = watched("core_v0.19.0_async_exit_duration")
    names = [e.name for e in events if e.name.startswith(("checkpoint_", "exit_"))]
    assert names == [
        "checkpoint_scheduled",
        "checkpoint_saved",
        "checkpoint_scheduled",
        "exit_duration",
        "checkpoint_saved",
    ]
    assert summary["checkpoints_saved"] == [500, 600] and not summary["training_done"]


def test_the_seed_guides_own_checkpoint_regex_meets_the_logs_it_was_written_for():
    guide = GUIDE.read_text()
    patterns = set(re.findall(r"pattern: '(successfully saved checkpoint[^']*)'", guide))
    assert patterns == {facts("seed_guide")["seed_guide_pattern"]}
    (pattern,) = patterns
    seed_guide_log = (LOGS / "seed_guide.log").read_text()
    assert [int(m.group("iteration")) for m in re.finditer(pattern, seed_guide_log)] == [500, 1000]
    # the wording it was written for is core 0.7's: a 2.x or core 0.6 log saves "at iteration" and it finds none,
    # where the built-in event finds every save
    builtin = dict((name, regex) for name, regex, _ in BUILTIN_EVENTS)["checkpoint_saved"]
    for stem in ("megatron_v2.6", "core_v0.6.0", "megatron_deepspeed"):
        text = (LOGS / f"{stem}.log").read_text()
        assert not re.search(pattern, text)
        assert [int(m.group("iteration")) for m in re.finditer(builtin, text)] == facts(stem)["checkpoints_saved"]


def test_events_on_a_v2_era_log_lists_every_checkpoint_save(capsys):
    assert cli(["events", str(LOGS / "megatron_v2.6.log")]) == 0
    lines = capsys.readouterr().out.splitlines()
    saves = [line for line in lines if "checkpoint_saved" in line]
    assert [int(re.search(r"iteration=(\d+)", line).group(1)) for line in saves] == [500, 1000, 1000]


OUTCOMES = {
    # stem: (the watcher's verdict, words of the reason, nodes excluded, the checkpoint it resumes from)
    "core_v0.19.0_rerun_16_first": ("retry", "exit 16", ["nid001234"], 734),
    "core_v0.19.0_rerun_16_same_gpu": ("retry", "exit 16", ["nid001234"], 734),
    "core_v0.19.0_rerun_17": ("fatal", "exit 17): Possible persistent error", [], None),
    "core_v0.12.0_nan": (
        "fatal",
        "NaN in the loss or the gradients (Megatron's check): Unexpected result nan",
        [],
        None,
    ),
    "core_v0.14.0_nan_intervals": ("fatal", "the loss diverged", [], None),
    "core_v0.19.0_async_exit_duration": ("retry", "exited before the last iteration after making progress", [], 600),
    "core_v0.19.0": ("success", "training finished", [], None),
    "megatron_v2.6": ("success", "training finished", [], None),
}


@pytest.mark.parametrize("stem", sorted(OUTCOMES))
def test_events_outcome_says_what_the_watcher_would_conclude(stem, capsys):
    expected = facts(stem)
    state = expected["slurm_state"] + (f":{expected['exit_code']}" if expected["exit_code"] is not None else "")
    assert cli(["events", str(LOGS / f"{stem}.log"), "--outcome", state, "--json"]) == 0
    conclusion = json.loads(capsys.readouterr().out.splitlines()[-1])
    verdict, reason, nodes, resume = OUTCOMES[stem]
    assert conclusion["verdict"] == verdict and reason in conclusion["reason"], conclusion
    assert conclusion["exclude_nodes"] == nodes and conclusion["resume_from"] == resume
    if expected.get("rerun"):
        assert conclusion["progress_free"] is (expected["rerun"]["exit"] == 16)


def test_events_outcome_in_words(capsys):
    assert cli(["events", str(LOGS / "core_v0.19.0_rerun_16_first.log"), "--outcome", "FAILED:16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == [
        "outcome: retry: resume on another GPU to check a result (Megatron's rerun state machine, exit 16)",
        "exclude nodes: nid001234",
        "resumes from: checkpoint 734",
    ]
    with pytest.raises(SystemExit) as bad:
        cli(["events", str(LOGS / "megatron_v2.6.log"), "--outcome", "RUNNING:x"])
    assert bad.value.code == 2
    assert "expected STATE[:EXIT_CODE] with a SLURM state" in capsys.readouterr().err


def test_events_outcome_uses_the_configs_own_rules(tmp_path, capsys):
    config = tmp_path / "monitoring.yaml"
    config.write_text(
        "monitoring:\n  nan_intervals: 0\n  rules:\n"
        "    - {verdict: retry, reason: 'our cluster: {detail}', when: nan, pattern: '(?P<detail>CANCELLED AT \\S+)'}\n"
    )
    log = str(LOGS / "core_v0.14.0_nan_intervals.log")
    assert cli(["events", log, "--outcome", "CANCELLED", "--config", str(config), "--json"]) == 0
    conclusion = json.loads(capsys.readouterr().out.splitlines()[-1])
    # nan_intervals 0 turns the fact off: the configured rule that needs it does not apply either
    assert conclusion["verdict"] == "fatal" and "unclassified" in conclusion["reason"]
    config.write_text(config.read_text().replace("nan_intervals: 0", "nan_intervals: 2"))
    assert cli(["events", log, "--outcome", "CANCELLED", "--config", str(config), "--json"]) == 0
    conclusion = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert conclusion["verdict"] == "retry" and conclusion["reason"] == "our cluster: CANCELLED AT 2026-04-18T23:42:57"


def test_json_stays_json_with_nan_fields(capsys):
    assert cli(["events", str(LOGS / "core_v0.14.0_nan_intervals.log"), "--json"]) == 0
    for line in capsys.readouterr().out.splitlines():
        for value in json.loads(line)["groups"].values():
            assert not (isinstance(value, float) and not math.isfinite(value))


def lay_out(save: Path, iteration: int, *, tracker: bool) -> None:
    """What Megatron writes for a torch_dist checkpoint: the iteration directory, then (maybe) the tracker."""
    (save / f"iter_{iteration:07d}").mkdir(parents=True, exist_ok=True)
    (save / f"iter_{iteration:07d}" / "metadata.json").write_text("{}")
    if tracker:
        (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def test_checkpoint_branches_trust_the_tracker_file_not_the_log_line(tmp_path):
    from airflow_oellm.megatron import checkpoints
    from tests.unit.test_monitor import run_probe

    # non-persistent saves: the log says `saved ... to <save>` for every one, but they went to <save>/non_persistent
    # and only the persistent ones (500, 1000) move <save>'s tracker
    expected = facts("core_v0.16.1_non_persistent")
    assert set(expected["checkpoint_dirs"]) == {"/scratch/np/ckpt"}  # every success line names <save>
    save = tmp_path / "ckpt"
    for iteration, written_to in zip(expected["checkpoints_saved"], expected["checkpoint_written_to"], strict=True):
        persistent = not written_to.endswith("/non_persistent")
        lay_out(save if persistent else save / "non_persistent", iteration, tracker=True)
        state = run_probe(save)
        assert (checkpoints.ready(state, str(save), iteration) is not None) is persistent, iteration
    # up to core 0.6 the line comes before the tracker is written: the branch waits for the tracker
    events, _ = watched("core_v0.6.0")
    first = next(e.groups["iteration"] for e in events if e.name == "checkpoint_saved")
    early = tmp_path / "early"
    lay_out(early, first, tracker=False)
    assert checkpoints.ready(run_probe(early), str(early), first) is None
    (early / "latest_checkpointed_iteration.txt").write_text(str(first))
    assert checkpoints.ready(run_probe(early), str(early), first).iteration == first


def test_the_models_size_is_read_from_megatrons_parameter_lines():
    """Lines as Megatron's format strings print them (training.py at core 0.8, 0.12 and 0.15; 0.19's two
    variants; theoretical_memory_usage.py's total): per model-parallel rank, the sum over tensor and pipeline
    ranks; another axis's ranks hold the same weights and count once; else the total in billions."""
    from airflow_oellm.megatron.logs import logged_parameters

    def read(lines: list[str]) -> dict:
        summary = empty_summary()
        for event in match_log("\n".join(lines).encode() + b"\n", event_specs()):
            summarize(summary, event)
        return summary

    tp_pp = [
        f" > number of parameters on (tensor, pipeline) model parallel rank ({t}, {p}): {1000 + 10 * t + p}"
        for t in (0, 1)
        for p in (0, 1)
    ]
    summary = read(["[default0]: " + tp_pp[0], *tp_pp[1:], "Total number of parameters in billions: 0.00"])
    assert logged_parameters(summary["parameters_by_rank"], summary["parameters_billions"]) == 4000 + 20 + 2
    core_19 = [
        f" > number of parameters on (tensor, gtp_weight_remat, pipeline) model parallel rank ({t}, {g}, {0}): {500}"
        for t in (0, 1)
        for g in (0, 1)
    ]
    other = " > number of parameters on (tensor, gtp_remat, pipeline) model parallel rank (0, 0, 1): 700"
    summary = read([*core_19, other])
    assert logged_parameters(summary["parameters_by_rank"], summary["parameters_billions"]) == 500 + 500 + 700
    only_total = read(["Total number of parameters in billions: 7.24"])
    assert logged_parameters(only_total["parameters_by_rank"], only_total["parameters_billions"]) == 7.24e9
    assert logged_parameters({}, None) is None
