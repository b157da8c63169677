"""Loss spikes, grad-norm spikes and NaN losses found in the iteration lines (monitor/anomalies.py).

The logs are the Megatron dialect fixtures (tests/fixtures/megatron_logs/): the real NaN logs as they
are, and longer logs rendered from each dialect's own iteration and checkpoint lines, with a loss curve
that spikes, goes NaN, or stays smooth."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.schema import AnomaliesConfig, LossSpikeConfig
from airflow_oellm.megatron.checkpoints import parse_rewind, rewind_script
from airflow_oellm.monitor.anomalies import AnomalyDetector, AnomalySettings, Divergence
from airflow_oellm.monitor.events import Event, event_specs, match_log
from airflow_oellm.monitor.watch import JobFollower, JobWatch, WatchState, empty_summary, summarize
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.operations import PollUpdate
from airflow_oellm.slurm.states import JobState, JobStatus
from tests.conftest import REPO

pytestmark = pytest.mark.anomalies

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "megatron_logs"
# one fixture per dialect whose iteration line carries the loss, and its checkpoint line
DIALECTS = [
    "megatron_v2.6",
    "core_v0.6.0",
    "core_v0.7.0",
    "core_v0.10.0",
    "core_v0.14.0",
    "core_v0.16.1",
    "core_v0.19.0",
    "megatron_bridge_v0.6.0",
    "megatron_deepspeed",
]
INTERVAL, SAVE_EVERY, TRAIN_ITERS = 10, 100, 1000


def _same_width(number: int, old: str) -> str:
    return str(number).rjust(len(old))


def dialect_lines(stem: str) -> tuple[str, str]:
    """The dialect's first iteration line with a loss, and its first checkpoint-saved line."""
    text = (LOGS / f"{stem}.log").read_text()
    iteration = next(line for line in text.splitlines() if re.search(r"iteration\s+\d+/.*lm loss:", line))
    saved = next(line for line in text.splitlines() if "successfully saved checkpoint" in line)
    return iteration, saved


def render_log(stem: str, losses: dict[int, float | None]) -> str:
    """A log in `stem`'s dialect: one iteration line per log interval with the given loss (None: a NaN
    interval as bf16 Megatron prints it, no `lm loss` and `grad norm: nan`), a save every SAVE_EVERY."""
    line, saved = dialect_lines(stem)
    out = []
    for iteration, loss in sorted(losses.items()):
        text = re.sub(
            r"iteration(\s+\d+)/(\s*\d+)",
            lambda m, it=iteration: f"iteration{_same_width(it, m.group(1))}/{_same_width(TRAIN_ITERS, m.group(2))}",
            line,
        )
        if loss is None:
            text = re.sub(r" lm loss: [^|]*\|", "", text)
            text = re.sub(r"grad norm: [^|]*\|", "grad norm: nan |", text)
        else:
            text = re.sub(r"lm loss: [^|]*\|", f"lm loss: {loss:.6E} |", text)
        out.append(text)
        if iteration % SAVE_EVERY == 0:
            out.append(re.sub(r"iteration\s+\d+ to", f"iteration {iteration:7d} to", saved))
    return "\n".join(out) + "\n"


def curve(spike_at: int | None = None, *, nan_from: int | None = None, seed: int = 3) -> dict[int, float | None]:
    """Log-interval means of a pretraining loss: a fast fall, then a slow one, with noise. From `spike_at` the
    loss jumps by 1.5 and decays back over ~400 iterations (a divergence that does not recover in time)."""
    rng = random.Random(seed)
    losses: dict[int, float | None] = {}
    for end in range(INTERVAL, TRAIN_ITERS + 1, INTERVAL):
        values = []
        for it in range(end - INTERVAL + 1, end + 1):
            loss = 2.0 + 6.0 * math.exp(-it / 150) + rng.gauss(0, 0.03)
            if spike_at is not None and it >= spike_at:
                loss += 1.5 * math.exp(-(it - spike_at) / 400)
            values.append(loss)
        losses[end] = None if nan_from is not None and end >= nan_from else sum(values) / len(values)
    return losses


def anomalies(log: str, config: AnomaliesConfig | None = None) -> list[Event]:
    detector = AnomalyDetector(AnomalySettings.from_config(config))
    return [e for e in detector.process(match_log(log.encode(), event_specs())) if e.metadata.get("kind") == "anomaly"]


@pytest.mark.megatron
@pytest.mark.parametrize("stem", DIALECTS)
@pytest.mark.parametrize("spike_at", [437, 555, 701])
def test_a_spike_is_found_within_two_log_intervals_with_the_checkpoint_before_it(stem, spike_at):
    found = anomalies(render_log(stem, curve(spike_at)))
    spikes = [e for e in found if e.name == "loss_spike"]
    assert len(spikes) == 1, [(e.name, e.groups) for e in found]
    spike = spikes[0].groups
    assert spike_at <= spike["iteration"] <= spike_at + 2 * INTERVAL
    assert spike["rewind_to"] == (spike_at // SAVE_EVERY) * SAVE_EVERY  # the last checkpoint before it
    assert spike["detected_at"] <= spike["iteration"] + 2 * INTERVAL
    # it does not come back within recover_within (20) intervals: unrecovered, the same target
    unrecovered = [e.groups for e in found if e.name == "loss_spike_unrecovered"]
    assert [(u["iteration"], u["rewind_to"]) for u in unrecovered] == [(spike["iteration"], spike["rewind_to"])]
    assert unrecovered[0]["detected_at"] == spike["iteration"] + 20 * INTERVAL


@pytest.mark.megatron
@pytest.mark.parametrize("stem", DIALECTS)
def test_a_smooth_run_has_no_anomaly(stem):
    for seed in range(5):
        assert anomalies(render_log(stem, curve(seed=seed))) == []


@pytest.mark.megatron
@pytest.mark.parametrize("stem", DIALECTS)
def test_a_nan_loss_is_found_at_its_first_interval_with_the_checkpoint_before_it(stem):
    found = anomalies(render_log(stem, curve(nan_from=640)))
    assert [(e.name, e.groups["iteration"], e.groups["rewind_to"]) for e in found] == [
        ("loss_nan", 640, 600),
        ("loss_nan_unrecovered", 640, 600),  # NaN for monitoring.nan_intervals (3) intervals: a rewind acts
    ]
    assert found[1].groups["detected_at"] == 660


@pytest.mark.megatron
def test_the_recorded_nan_logs():
    """fp16 core 0.14: NaN from step 677, counted in `number of nan iterations` (log interval 100, saves
    every 500); core 0.12: Megatron's own check stops the run at step 735."""
    counted = anomalies((LOGS / "core_v0.14.0_nan_intervals.log").read_text())
    assert [(e.name, e.groups["iteration"], e.groups["rewind_to"]) for e in counted] == [
        ("loss_nan", 700, 500),
        ("loss_nan_unrecovered", 700, 500),
    ]
    assert counted[0].groups["nan_iterations"] == 24
    checked = anomalies((LOGS / "core_v0.12.0_nan.log").read_text())
    assert [(e.name, e.groups["iteration"], e.groups["rewind_to"]) for e in checked] == [("loss_nan", 735, 500)]


@pytest.mark.megatron
def test_no_recorded_dialect_log_has_a_loss_spike():
    for log in LOGS.glob("*.log"):
        found = anomalies(log.read_text())
        assert {e.name for e in found} <= {"loss_nan", "loss_nan_unrecovered"}, (log.name, found)


def iteration_event(iteration: int, loss: float | str | None = None, **more) -> Event:
    groups = {"iteration": iteration, "train_iters": 10_000, **more}
    if loss is not None:
        groups["loss"] = loss
    return Event("iteration", groups, {"kind": "progress"}, f"iteration {iteration}", iteration, iteration * 100)


def saved(iteration: int) -> Event:
    return Event("checkpoint_saved", {"iteration": iteration, "path": "/ckpt"}, {}, "saved", 0, 0)


def run(
    losses: list[float | str | None], config: LossSpikeConfig | None = None, bf16_nan_at: int = 0, **kw
) -> list[tuple[str, dict]]:
    """The anomalies of a run logging `losses` at iterations 1, 2, ...; at `bf16_nan_at` the loss is
    left out and the grad norm is `nan` (bf16 Megatron's NaN interval)."""
    settings = AnomalySettings.from_config(AnomaliesConfig(loss_spike=config or LossSpikeConfig(), **kw))
    detector = AnomalyDetector(settings)
    events = [saved(0)]
    for i, loss in enumerate(losses, 1):
        events.append(iteration_event(i, loss, **({"grad_norm": "nan"} if i == bf16_nan_at else {})))
    return [(e.name, e.groups) for e in detector.process(events) if e.metadata.get("kind") == "anomaly"]


FLAT = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(30)]


def test_one_high_interval_is_not_a_spike_two_are_and_it_may_recover():
    assert run([*FLAT, 5.0, *FLAT]) == []
    found = run([*FLAT, 5.0, 5.5, 3.0, *FLAT])
    assert [name for name, _ in found] == ["loss_spike", "loss_spike_recovered"]
    spike, recovered = found[0][1], found[1][1]
    assert (spike["iteration"], spike["detected_at"], spike["peak"], spike["rewind_to"]) == (31, 32, 5.5, 0)
    assert (recovered["iteration"], recovered["spike_start"], recovered["intervals"]) == (33, 31, 2)


def test_a_spike_still_high_after_recover_within_is_unrecovered_once():
    found = run([*FLAT, *[6.0] * 40], LossSpikeConfig(recover_within=5))
    assert [(name, g["iteration"], g["detected_at"]) for name, g in found] == [
        ("loss_spike", 31, 32),
        ("loss_spike_unrecovered", 31, 36),
    ]


def test_nothing_is_judged_before_min_history_and_a_null_rule_judges_nothing():
    assert run([3.0, 3.0, 9.0, 9.0, 9.0]) == []
    settings = AnomalySettings.from_config(AnomaliesConfig(loss_spike=None))
    events = [iteration_event(i + 1, v) for i, v in enumerate([*FLAT, 9.0, 9.0, 9.0])]
    assert [e for e in AnomalyDetector(settings).process(events) if e.metadata.get("kind") == "anomaly"] == []


def test_the_rewind_target_is_the_last_checkpoint_at_or_before_the_last_normal_interval_minus_the_margin():
    detector = AnomalyDetector(AnomalySettings.from_config(AnomaliesConfig(rewind_margin=150)))
    events = []
    for it in range(10, 1010, 10):
        events.append(iteration_event(it, 3.0 if it < 730 else 8.0))
        if it % 100 == 0:
            events.append(saved(it))
    spike = next(e.groups for e in detector.process(events) if e.name == "loss_spike")
    assert (spike["iteration"], spike["rewind_to"]) == (730, 500)  # last normal 720, minus 150: 570 -> 500
    assert detector.rewind_to(730, 720) == 500
    assert AnomalyDetector().rewind_to(5, None) is None  # no checkpoint known: the start of training


def test_nan_intervals_begin_at_the_first_and_end_with_a_finite_loss():
    found = run([*FLAT, "nan", None, "inf", 3.0, 3.0], bf16_nan_at=32)
    assert [(name, g["iteration"]) for name, g in found] == [
        ("loss_nan", 31),
        ("loss_nan_unrecovered", 31),
        ("loss_nan_recovered", 34),
    ]
    assert found[1][1]["detected_at"] == 33 and found[2][1]["intervals"] == 3
    counted = [iteration_event(1, 3.0, nan_iterations=0), iteration_event(2, 3.0, nan_iterations=4)]
    assert [e.name for e in AnomalyDetector().process(counted) if e.metadata.get("kind") == "anomaly"] == ["loss_nan"]


def test_grad_norm_spikes_are_their_own_events():
    detector = AnomalyDetector()
    events = [iteration_event(i + 1, 3.0, grad_norm=0.3 + 0.01 * (i % 3)) for i in range(30)]
    events.append(iteration_event(31, 3.0, grad_norm=4.0))
    found = [(e.name, e.groups["iteration"]) for e in detector.process(events) if e.metadata.get("kind") == "anomaly"]
    assert found == [("grad_norm_spike", 31)]


values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(["nan", "inf", "-inf", "x"]),
)
lines = st.lists(
    st.tuples(st.integers(-5, 10**6), values, values, st.one_of(st.none(), st.integers(-3, 100))), max_size=80
)


def events_of(items) -> list[Event]:
    out = []
    for iteration, loss, grad_norm, nan_iterations in items:
        more = {"grad_norm": grad_norm} if grad_norm is not None else {}
        if nan_iterations is not None:
            more["nan_iterations"] = nan_iterations
        out.append(iteration_event(iteration, loss, **more))
        if iteration % 7 == 0:
            out.append(saved(iteration))
    return out


@settings(max_examples=300, deadline=None)
@given(lines, st.integers(0, 80))
def test_any_sequence_is_judged_the_same_across_a_saved_state_and_never_raises(items, cut):
    events = events_of(items)
    whole = AnomalyDetector().process(events)
    first = AnomalyDetector()
    part = first.process(events[:cut])
    saved_state = json.loads(json.dumps(first.state(), allow_nan=False))  # what the watch state stores
    part += AnomalyDetector(None, saved_state).process(events[cut:])
    assert [(e.name, e.groups) for e in part] == [(e.name, e.groups) for e in whole]
    for event in whole:
        if event.metadata.get("kind") == "anomaly":
            json.dumps(event.groups, allow_nan=False)


def test_the_watch_reports_anomalies_in_its_events_summary_and_saved_state():
    log = render_log("core_v0.19.0", curve(437)).encode()
    watch = JobWatch(event_specs(), WatchState("7", "/log"), inactivity_threshold=None, now=0)
    running, names, noteworthy = JobStatus("7", JobState.RUNNING), [], []
    for offset in range(0, len(log), 4096):  # as a poll reads it, a chunk at a time
        chunk = FileChunk("/log", offset, len(log), log[offset : offset + 4096])
        step = watch.apply(float(offset), running, chunk)
        found = [e.name for e in step.events if e.metadata.get("kind") == "anomaly"]
        names += found
        if found:  # the state is saved at once, as after a checkpoint
            noteworthy.append(step.noteworthy)
        if offset == 4096 * 8:  # the triggerer restarts: a new watch from the saved state
            state = WatchState.from_json(watch.state.to_json(), "7", "/log")
            watch = JobWatch(event_specs(), state, inactivity_threshold=None, now=0)
    assert names == ["loss_spike", "loss_spike_unrecovered", "loss_spike_recovered"]
    kept = watch.state.summary["anomalies"]
    assert [(a["name"], a.get("rewind_to")) for a in kept] == [
        ("loss_spike", 400),
        ("loss_spike_unrecovered", 400),
        ("loss_spike_recovered", None),
    ]
    assert noteworthy and all(noteworthy)
    assert watch.state.summary["counts"]["loss_spike"] == 1
    summary = empty_summary()
    for event in AnomalyDetector().process(match_log(log, event_specs())):
        summarize(summary, event)
    assert summary["anomalies"] == kept


@pytest.mark.cli
def test_airflow_oellm_events_reports_the_spike_and_the_nan(tmp_path):
    spiking, nan = tmp_path / "spike.log", tmp_path / "nan.log"
    spiking.write_text(render_log("core_v0.16.1", curve(555)))
    nan.write_text(render_log("megatron_v2.6", curve(nan_from=640)))
    for log, name, start, target in ((spiking, "loss_spike", (555, 575), 500), (nan, "loss_nan", (640, 640), 600)):
        out = subprocess.run(
            [sys.executable, "-m", "airflow_oellm.cli", "events", str(log), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = [json.loads(line) for line in out.splitlines()]
        event = next(e for e in found if e["name"] == name)
        assert start[0] <= event["groups"]["iteration"] <= start[1] and event["groups"]["rewind_to"] == target
        assert event["metadata"] == {"kind": "anomaly"}
    text = subprocess.run(
        [sys.executable, "-m", "airflow_oellm.cli", "events", str(spiking)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"loss_spike\s+iteration=5[5-7]\d detected_at=\d+ loss=.* rewind_to=500", text), text


@pytest.mark.config
def test_spike_settings_that_could_never_judge_anything_are_refused(write, project):
    path = write(
        "config/sweeps/a.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: p, base_output_dir: /r}
        monitoring:
          anomalies:
            loss_spike: {window: 5, min_history: 8, sustain: 3, recover_within: 2, threshold_sigmas: -1}
            grad_norm_spike: {min_history: 1}
            rewind_margin: -3
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    text = str(caught.value)
    for expected in (
        "monitoring.anomalies.rewind_margin: must be >= 0",
        "monitoring.anomalies.loss_spike.window: must be at least min_history (8), or no value is ever judged",
        "monitoring.anomalies.loss_spike.threshold_sigmas: must be >= 0",
        "monitoring.anomalies.loss_spike.recover_within: must be at least sustain (3)",
        "monitoring.anomalies.grad_norm_spike.min_history: must be at least 2",
    ):
        assert expected in text, text
    fine = write(
        "config/sweeps/b.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: p, base_output_dir: /r}
        monitoring: {anomalies: {loss_spike: null, grad_norm_spike: {sustain: 2, recover_within: 5}}}
        """,
    )
    config = load_sweep(fine).experiments[0].config.monitoring.anomalies
    settings = AnomalySettings.from_config(config)
    assert [(r.event, r.sustain, r.recover_within) for r in settings.rules] == [("grad_norm_spike", 2, 5)]


@pytest.mark.config
def test_a_lowered_learning_rate_that_could_change_nothing_or_has_no_rate_to_lower_is_refused(write, project):
    def load(rewind: str, args: str = "lr: 3.0e-4, min_lr: 3.0e-5", backend: str = "") -> str:
        path = write(
            "config/sweeps/lr.yaml",
            f"""
            defaults: [{{platform: mini}}]
            project: {{name: p, base_output_dir: /r}}
            backend: {{{backend}args: {{train_iters: 1000, save_interval: 100, {args}}}}}
            monitoring: {{anomalies: {{rewind: {rewind}}}}}
            """,
        )
        try:
            return str(load_sweep(path).experiments[0].config.monitoring.anomalies.rewind.learning_rate)
        except ConfigError as exc:
            return str(exc)

    key = "monitoring.anomalies.rewind.learning_rate"
    assert load("{}") == "None" and load("{learning_rate: null}") == "None"
    assert load("{learning_rate: {}}") == "LearningRateRemedyConfig(multiplier=0.5, iterations=100)"
    # YAML reads 3e-4 as a string; min_lr may be left to Megatron's default
    assert load("{learning_rate: {multiplier: 0.1}}", "lr: 3e-4").startswith("LearningRateRemedyConfig(multiplier=0.1")
    assert f"{key}.multiplier: must be above 0 and not 1 (1 changes nothing), got 1" in load(
        "{learning_rate: {multiplier: 1}}"
    )
    assert f"{key}.multiplier: must be above 0" in load("{learning_rate: {multiplier: -0.5}}")
    assert f"{key}.iterations: must be at least 1, got 0" in load("{learning_rate: {iterations: 0}}")
    assert f"{key}: lowers a rewound training's rate, but rewind.max_rewinds is 0: nothing is rewound" in load(
        "{max_rewinds: 0, learning_rate: {}}"
    )
    assert f"backend.args.lr: is not set: {key} has no rate to lower" in load("{learning_rate: {}}", "lr: null")
    assert f"backend.args.min_lr: must be a number for {key} to lower, got 'low'" in load(
        "{learning_rate: {}}", "lr: 3.0e-4, min_lr: low"
    )
    assert f"{key}: lowers a rewound Megatron training's rate; backend 'command' is never rewound" in load(
        "{learning_rate: {}}", backend="name: command, command: [./train.sh], "
    )


def rewind(checkpoint_dir: Path, iteration: int, discard_dir: Path) -> subprocess.CompletedProcess[str]:
    script = rewind_script(str(checkpoint_dir), iteration, str(discard_dir))
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=checkpoint_dir.anchor)


def saves(directory: Path, *iterations: int) -> None:
    for iteration in iterations:
        (directory / f"iter_{iteration:07d}").mkdir(parents=True)
        (directory / f"iter_{iteration:07d}" / "metadata.json").write_text("{}")
    (directory / "latest_checkpointed_iteration.txt").write_text(str(max(iterations)))


def test_a_rewind_sets_the_tracker_back_and_moves_later_checkpoints_aside(tmp_path):
    ckpt = tmp_path / "it's a $(touch /tmp/oellm-pwned) `touch /tmp/oellm-pwned` dir" / "checkpoints"
    saves(ckpt, 100, 200, 300)
    (ckpt / "iter_notanumber").mkdir()
    discarded = ckpt / "discarded" / "rewind-1"
    done = rewind(ckpt, 100, discarded)
    assert done.returncode == 0, done.stderr
    assert parse_rewind(done.stdout) == [200, 300]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000100", "iter_notanumber"]
    assert sorted(p.name for p in discarded.iterdir()) == ["iter_0000200", "iter_0000300"]
    assert (discarded / "iter_0000300" / "metadata.json").exists()  # moved, never deleted
    again = rewind(ckpt, 100, discarded)  # a retried rewind finishes what is left: nothing here
    assert again.returncode == 0 and parse_rewind(again.stdout) == []
    assert not Path("/tmp/oellm-pwned").exists()  # the names stayed text


def test_an_interrupted_rewind_already_resumes_from_its_target_and_a_rerun_finishes_it(tmp_path):
    ckpt, discarded = tmp_path / "ckpt", tmp_path / "ckpt" / "discarded" / "r"
    saves(ckpt, 100, 200, 300)
    (discarded / "iter_0000200").mkdir(parents=True)  # a rerun must not merge into what an earlier one moved
    failed = rewind(ckpt, 100, discarded)
    assert failed.returncode == 3 and "iter_0000200 exists" in failed.stderr
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "100"  # the tracker went first
    missing = rewind(ckpt, 150, discarded)
    assert missing.returncode == 3 and "checkpoint 150 is missing" in missing.stderr


def test_a_rewind_to_the_start_leaves_no_tracker(tmp_path):
    ckpt, discarded = tmp_path / "ckpt", tmp_path / "discarded"
    saves(ckpt, 100)
    done = rewind(ckpt, 0, discarded)
    assert done.returncode == 0 and parse_rewind(done.stdout) == [100]
    assert not (ckpt / "latest_checkpointed_iteration.txt").exists()
    assert (discarded / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert rewind(tmp_path / "nowhere", 0, discarded).returncode == 3
    with pytest.raises(ValueError):
        rewind_script("/c", -1, "/d")


def follow(log: bytes, *, rewind: bool, nan_limit: int = 0) -> tuple[list, JobFollower]:
    """Feed a running job's log to a follower a chunk per poll (its saves landing), then poll on; the
    FollowSteps that cancel, each with the notices of the step that decided it."""
    follower = JobFollower("7", "/log", "/state", event_specs(), inactivity_threshold=None, nan_limit=nan_limit,
                           rewind=rewind)  # fmt: skip
    follower.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0.0)
    running, cancels, decided = JobStatus("7", JobState.RUNNING), [], []
    for offset in [*range(0, len(log), 2048), len(log)]:
        chunk = FileChunk("/log", offset, len(log), log[offset : offset + 2048])
        landed = tuple(True for _ in follower.request().writes)
        step = follower.on_update(PollUpdate("7", running, 2 + offset, chunks=(chunk,), writes_ok=landed), offset)
        if step.cancel:  # decided by an earlier step, done once the state saying so was saved
            assert decided and follower.watch.state.cancelled_by_us
            cancels.append(replace(step, later=decided[-1].later))
        if step.poll_again:
            decided.append(step)
    return cancels, follower


def test_an_unrecovered_spike_kills_the_job_for_a_rewind_only_when_rewinds_are_on():
    log = render_log("core_v0.19.0", curve(437)).encode()
    cancels, follower = follow(log, rewind=True)
    assert [c.kill for c in cancels] == [True]  # once, and no exit handler may save
    assert any(
        "did not recover: killing it, without a save, to rewind to checkpoint 400" in m for _, m in cancels[0].later
    )
    state = follower.watch.state
    assert state.cancelled_by_us and state.divergence["anomaly"] == "loss_spike"
    d = Divergence.from_dict(state.divergence)
    assert (d.start, d.rewind_to, d.last_normal) == (440, 400, 430) and d.detected_at == 440 + 20 * INTERVAL
    assert d.skipped() == list(range(430, 641))
    assert follower.result(b"")["divergence"] == state.divergence
    assert follow(log, rewind=False)[0] == []  # events only: the job trains on


def test_a_lasting_nan_loss_kills_the_job_for_a_rewind():
    log = render_log("megatron_v2.6", curve(nan_from=640)).encode()
    cancels, follower = follow(log, rewind=True, nan_limit=3)
    assert [c.kill for c in cancels] == [True]
    d = Divergence.from_dict(follower.watch.state.divergence)
    assert (d.anomaly, d.start, d.last_normal, d.detected_at, d.rewind_to) == ("loss_nan", 640, 630, 660, 600)
    cancels, follower = follow(log, rewind=False, nan_limit=3)  # no rewinds: stopped as diverged, as before
    assert [c.kill for c in cancels] == [False] and follower.watch.state.divergence is None


@pytest.mark.render
def test_the_skipped_iterations_reach_the_job_script_beside_the_configs_own():
    from airflow_oellm.config.milestones import skipping_iterations, typed
    from airflow_oellm.jobscript.render import JobSpec, render_sbatch

    experiment = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    config = experiment.runtime_config()
    config["backend"]["args"]["iterations_to_skip"] = 7
    cfg = skipping_iterations(typed(config), [12, 11, 7])
    assert cfg.backend.args["iterations_to_skip"] == [7, 11, 12]
    assert '--iterations-to-skip "7" "11" "12"' in render_sbatch(cfg, JobSpec(job_name="x"))
    assert skipping_iterations(typed(config), []).backend.args["iterations_to_skip"] == 7


@pytest.mark.render
def test_a_lowered_learning_rate_reaches_the_job_script_and_the_configured_one_replaces_it_after():
    from airflow_oellm.config.milestones import typed, with_learning_rate
    from airflow_oellm.jobscript.render import JobSpec, render_sbatch

    experiment = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    config = experiment.runtime_config()
    config["backend"]["args"].update(lr="3e-4", min_lr=3.0e-5)  # YAML's string for 3e-4, as a user writes it
    lowered = render_sbatch(with_learning_rate(typed(config), 0.5, 1250), JobSpec(job_name="x"))
    flags = dict(re.findall(r"--(lr|min-lr|exit-interval) \"?([^\s\"]+)", lowered))
    assert (float(flags["lr"]), float(flags["min-lr"]), flags["exit-interval"]) == (1.5e-4, 1.5e-5, "1250")
    assert "--override-opt_param-scheduler" in lowered  # the spelling every Megatron core knows
    configured = render_sbatch(with_learning_rate(typed(config), 1.0, None), JobSpec(job_name="x"))
    flags = dict(re.findall(r"--(lr|min-lr) \"?([^\s\"]+)", configured))
    assert (float(flags["lr"]), float(flags["min-lr"])) == (3e-4, 3e-5)
    assert "--override-opt_param-scheduler" in configured and "--exit-interval" not in configured


@pytest.mark.render
def test_the_flags_a_cooldown_and_a_lowered_rewind_add_are_defined_by_every_megatron_core():
    """Megatron core up to 0.14 spells `--override-opt_param-scheduler` so, and only so: the all-dashes form
    made every cooldown's job fail with an unknown argument there (tests/fixtures/megatron/flags.json)."""
    from airflow_oellm.config.milestones import job_config, skipping_iterations, typed, with_learning_rate
    from airflow_oellm.jobscript.render import JobSpec, render_sbatch

    defined = json.loads((REPO / "tests" / "fixtures" / "megatron" / "flags.json").read_text())["flags"]
    experiment = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    config = experiment.runtime_config()
    configured = set(
        re.findall(r"(?<=\s)--[A-Za-z0-9][A-Za-z0-9_-]*", render_sbatch(typed(config), JobSpec(job_name="x")))
    )
    cooldown = typed(job_config(config, {"kind": "cooldown", "cooldown": 0}))
    rewound = skipping_iterations(with_learning_rate(typed(config), 0.5, 300), [120, 121])
    for cfg in (cooldown, rewound):
        script = render_sbatch(cfg, JobSpec(job_name="x"))
        added = set(re.findall(r"(?<=\s)--[A-Za-z0-9][A-Za-z0-9_-]*", script)) - configured
        assert "--override-opt_param-scheduler" in added, added
        for tag, flags in defined.items():
            version = tuple(int(part) for part in tag.removeprefix("core_v").split("."))
            missing = added - set(flags) - ({"--iterations-to-skip"} if version < (0, 12) else set())  # core 0.12+
            assert not missing, (tag, missing)


def test_checkpoints_saved_while_the_loss_is_wrong_wait_for_its_recovery_or_rewind():
    from airflow_oellm.megatron.checkpoints import CheckpointState
    from airflow_oellm.monitor.records import TrainingState, TrainingStatus
    from airflow_oellm.monitor.waiting import checkpoint_decision

    state = CheckpointState(300, {100: "torch_dist", 200: "torch_dist", 300: "torch_dist"})

    def decide(iteration: int, status: TrainingStatus) -> str:
        round_tripped = TrainingStatus.from_json(status.to_json().encode(), "r")
        return checkpoint_decision(state, "/ckpt", iteration, False, round_tripped).kind

    spiking = TrainingStatus(TrainingState.RUNNING, "r", 1, "7", "/log", 0.0, suspect_from=251)
    assert [decide(i, spiking) for i in (100, 200, 300)] == ["ready", "ready", "wait"]
    assert decide(300, TrainingStatus(TrainingState.RUNNING, "r", 1, "7", "/log", 0.0)) == "ready"
    # ended (rewound, or not): the status the operator writes then decides, with the tracker
    assert decide(300, TrainingStatus(TrainingState.RETRYING, "r", 1, "7", "/log", 0.0, suspect_from=251)) == "ready"


def test_the_follower_tells_the_branches_when_the_loss_goes_wrong_and_when_it_is_right_again():
    from airflow_oellm.monitor.records import TrainingState, TrainingStatus

    submitted = TrainingStatus(TrainingState.RUNNING, "r", 1, "7", "/log", 0.0).to_json()
    spike = [*FLAT, 6.0, 6.5, *[3.0] * 5]  # a spike at 31-32 that recovers at 33
    log = "".join(
        f" iteration {i:8d}/     100 | consumed samples: {i * 8:12d} | lm loss: {loss:.6E} | grad norm: 0.500 |\n"
        for i, loss in enumerate(spike, 1)
    ).encode()

    def statuses(rewind: bool) -> list[int | None]:
        follower = JobFollower("7", "/log", "/state", event_specs(), inactivity_threshold=None, nan_limit=3,
                               rewind=rewind, status_path="/status", status=submitted)  # fmt: skip
        follower.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0.0)
        running, written, offset = JobStatus("7", JobState.RUNNING), [], 0
        for line in log.splitlines(keepends=True):
            chunk = FileChunk("/log", offset, len(log), line)
            writes = [w for w in follower.request().writes if w[0] == "/status"]
            written += [TrainingStatus.from_json(data, "r").suspect_from for _, data in writes]
            ok = tuple(True for _ in follower.request().writes)
            follower.on_update(PollUpdate("7", running, 2 + offset, chunks=(chunk,), writes_ok=ok), float(offset))
            offset += len(line)
        return written

    assert statuses(rewind=True) == [31, None]  # from the first high interval on, until it recovered
    assert statuses(rewind=False) == []  # no rewinds: nothing will be rewound away, nothing to wait for


def test_a_job_that_resumes_a_training_judges_its_first_intervals_against_the_trainings_losses():
    """After a rewind (or any resume) the spike can come back at once: with no baseline the detector would take
    its first 10 intervals as normal, the spike with them, and never see it."""
    from airflow_oellm.monitor.attempts import job_settings, loss_baseline
    from airflow_oellm.monitor.records import AttemptHistory

    earlier = [[i, v] for i, v in enumerate(FLAT, 1)] + [[i, 9.0] for i in range(31, 60)]  # diverged after 30
    history = AttemptHistory.from_dict(
        {
            "attempts": [
                {
                    "try": 1,
                    "job_id": "1",
                    "verdict": "retry",
                    "loss_curve": earlier,
                    "rewind": {"id": "rewind-1-job1", "rewind_to": 30},
                }
            ]
        }
    )
    experiment = load_sweep(REPO / "config" / "sweeps" / "cooldowns_and_evals.yaml").experiments[0]
    settings = job_settings(experiment=experiment.runtime_config(), job=None, task_id="train")
    baseline = loss_baseline(history, 30, settings)
    assert baseline == FLAT  # the kept losses up to the checkpoint resumed, none of the discarded ones
    assert loss_baseline(history, None, settings) == []  # a fresh start: nothing to compare with

    lines = "".join(
        f" iteration {i:8d}/     100 | consumed samples: {i * 8:12d} | lm loss: {loss:.6E} | grad norm: 0.500 |\n"
        for i, loss in ((31, 9.0), (32, 9.1), (33, 9.0))
    ).encode()

    def spikes(seed: list[float]) -> list[str]:
        follower = JobFollower("8", "/log", "/state", event_specs(), inactivity_threshold=None, nan_limit=3,
                               loss_baseline=seed)  # fmt: skip
        follower.on_update(PollUpdate("8", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0.0)
        running = JobStatus("8", JobState.RUNNING)
        follower.on_update(PollUpdate("8", running, 2, chunks=(FileChunk("/log", 0, len(lines), lines),)), 1.0)
        return [a["name"] for a in follower.watch.state.summary["anomalies"] if a["name"].startswith("loss_spike")]

    assert spikes(baseline) == ["loss_spike"]
    assert spikes([]) == []
