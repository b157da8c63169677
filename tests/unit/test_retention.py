"""Checkpoint retention (monitor/retention.py): what may be deleted, and what a rewind could still load."""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.megatron.checkpoints import (
    TRACKER_FILE,
    CheckpointState,
    iteration_dir,
    parse_retention,
    retention_script,
)
from airflow_oellm.megatron.size import human_bytes, parameter_count
from airflow_oellm.monitor.anomalies import AnomalyDetector, AnomalySettings
from airflow_oellm.monitor.events import Event, event_specs
from airflow_oellm.monitor.records import TrainingState, TrainingStatus
from airflow_oellm.monitor.retention import (
    Deletion,
    RetentionSettings,
    deletions,
    most_kept,
)
from airflow_oellm.monitor.watch import JobFollower
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.operations import PollUpdate
from airflow_oellm.slurm.states import JobState, JobStatus
from tests.unit.test_anomalies import curve, render_log

pytestmark = [pytest.mark.unit, pytest.mark.anomalies]


def test_the_newest_the_multiples_the_tracker_and_the_rewind_targets_stay():
    keep = RetentionSettings(keep_last=2, keep_every=500)
    complete = [100, 200, 300, 400, 500, 600, 700, 800]
    gone = deletions(
        complete,
        keep,
        tracker=800,
        rewind_needs=[300],
        branches={200: ["/o/jobs/convert_iter_0000200/.oellm/status/checkpoint.convert.json"]},
    )
    assert gone == [
        Deletion(100),
        Deletion(200, ("/o/jobs/convert_iter_0000200/.oellm/status/checkpoint.convert.json",)),
        Deletion(400),
        Deletion(600),
    ]
    # the tracker set back by a rewind names an older one: it stays
    assert Deletion(400) not in deletions(complete, keep, tracker=400)
    assert deletions([100], keep, tracker=100) == []


def test_settings_round_trip_and_refuse_keeping_nothing():
    keep = RetentionSettings(3, 1000)
    assert RetentionSettings.from_dict(keep.to_dict()) == keep and RetentionSettings.from_dict(None) is None
    with pytest.raises(ValueError):
        RetentionSettings(0)
    with pytest.raises(ValueError):
        RetentionSettings(1, -5)


def test_disk_figures_for_plan():
    saved = list(range(100, 1100, 100))
    keep = RetentionSettings(keep_last=2, keep_every=500)
    assert most_kept(saved, keep) == 4  # 2 newest + 500 + a rewind target among the older ones
    assert most_kept(saved, keep, branch_points={200, 300}) == 6
    assert most_kept([100], keep) == 1


def events(*lines: tuple) -> list[Event]:
    out = []
    for number, (name, groups) in enumerate(lines):
        out.append(Event(name, groups, {}, "", number, number))
    return out


def iteration(i: int, loss: float) -> tuple:
    return ("iteration", {"iteration": i, "loss": loss})


def saved(i: int) -> tuple:
    return ("checkpoint_saved", {"iteration": i})


def test_a_rewind_needs_the_next_anomalys_target_and_a_pending_ones():
    detector = AnomalyDetector(AnomalySettings.from_config())
    assert detector.rewind_needs() == []
    normal = [iteration(i, 5.0 - i / 1000) for i in range(10, 310, 10)]
    detector.process(events(*normal[:10], saved(100), *normal[10:20], saved(200), *normal[20:25]))
    assert detector.rewind_needs() == [200]  # an anomaly from the next interval on goes back to 200
    detector.process(events(iteration(260, 9.0), iteration(270, 9.5), saved(300), iteration(280, 9.4)))
    # a spike since 260: its target 200 stays needed while 300 (saved during it) is not
    assert detector.suspect_from() == 260 and detector.rewind_needs() == [200]
    detector.process(events(*[iteration(i, 4.7) for i in range(290, 400, 10)]))
    assert detector.suspect_from() is None and detector.rewind_needs() == [300]  # recovered: 300 is normal history


def test_a_nan_pending_keeps_its_target():
    detector = AnomalyDetector(AnomalySettings.from_config())
    detector.process(events(saved(100), iteration(110, 5.0), saved(200), iteration(210, 4.9)))
    detector.process(events(("iteration", {"iteration": 220, "loss": float("nan")}), saved(300)))
    assert detector.rewind_needs() == [200]  # 300 was saved with a NaN loss
    detector.process(events(iteration(310, 4.8)))
    assert detector.rewind_needs() == [300]  # finite again: 300 is what an anomaly from now on goes back to


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.integers(1, 60), min_size=1).map(lambda s: sorted(i * 50 for i in s)),
    st.integers(1, 5),
    st.sampled_from([0, 100, 250, 1000]),
    st.lists(st.integers(1, 60).map(lambda i: i * 50), max_size=3),
)
def test_deletions_never_touch_what_must_stay(complete, keep_last, keep_every, needs):
    keep = RetentionSettings(keep_last, keep_every)
    tracker = complete[-1]
    gone = [d.iteration for d in deletions(complete, keep, tracker=tracker, rewind_needs=needs)]
    assert gone == sorted(gone) and set(gone) <= set(complete)
    assert not set(gone) & {tracker, *needs, *complete[-keep_last:]}
    assert all(keep_every == 0 or i % keep_every for i in gone)
    assert len(complete) - len(gone) <= keep_last + len(needs) + 1 + sum(
        1 for i in complete if keep_every and not i % keep_every
    )


def test_the_deletion_script_keeps_the_tracker_and_what_a_branch_has_not_completed(tmp_path):
    """Real bash on a real directory: the tracker's checkpoint and one whose branch task is still running stay;
    the rest go; a missing one is no error."""
    ckpt = tmp_path / "check points"
    for n in (100, 200, 300, 400):
        (ckpt / iteration_dir(n)).mkdir(parents=True)
    (ckpt / TRACKER_FILE).write_text("200")  # set back by a rewind
    running, done = tmp_path / "running.json", tmp_path / "done.json"
    running.write_text(TrainingStatus(TrainingState.RUNNING, "r", 1, "7", "/log", 0.0).to_json())
    done.write_text(TrainingStatus(TrainingState.COMPLETED, "r", 1, "8", "/log", 0.0).to_json())
    plan = [(100, [str(done)]), (200, []), (300, [str(done), str(running)]), (500, [])]
    ran = subprocess.run(["bash", "-c", retention_script(str(ckpt), plan)], capture_output=True, text=True)
    assert ran.returncode == 0
    assert parse_retention(ran.stdout) == ([100], [200, 300]), ran.stdout + ran.stderr
    left = sorted(p.name for p in ckpt.iterdir())
    assert left == [*(iteration_dir(n) for n in (200, 300, 400)), TRACKER_FILE]
    assert subprocess.run(["bash", "-c", retention_script(str(tmp_path / "none"), plan)]).returncode == 0
    with pytest.raises(ValueError):
        retention_script(str(ckpt), [(0, [])])


def test_the_watch_probes_after_each_complete_save_and_lets_go_of_what_may_be_deleted():
    """The follower of a real dialect's log: after each save the next cycle probes the directory, and that
    cycle's step names what to delete (with the status files of the branches from it, which the script checks):
    with keep_last 1 and a smooth loss, every save but the newest (the one a rewind would load)."""
    log = render_log("core_v0.19.0", curve()).encode()  # saves every 100, log interval 10
    branches = {200: ["/o/jobs/convert_iter_0000200/.oellm/status/checkpoint.convert.json"]}
    follower = JobFollower(
        "7", "/log", "/state", event_specs(), inactivity_threshold=None, nan_limit=0, rewind=True,
        retention=RetentionSettings(keep_last=1), checkpoint_dir="/ckpt", branches=branches,
    )  # fmt: skip
    follower.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0.0)
    running, deleted = JobStatus("7", JobState.RUNNING), []
    for cycle, offset in enumerate(range(0, len(log) + 1500, 1500), start=2):
        on_disk = sorted(set(follower.watch.detector.checkpoints) - set(deleted))  # what the script left
        request = follower.request()
        probes = tuple(CheckpointState(on_disk[-1], dict.fromkeys(on_disk, "torch_dist")) for _ in request.checkpoints)
        chunk = FileChunk("/log", offset, len(log), log[offset : offset + 1500])
        landed = tuple(True for _ in request.writes)
        update = PollUpdate("7", running, cycle, chunks=(chunk,), checkpoints=probes, writes_ok=landed)
        step = follower.on_update(update, float(cycle))
        assert not step.delete or probes, "deletions come only from a probe"
        for iteration, status_files in step.delete:
            assert status_files == tuple(branches.get(iteration, ()))
            deleted.append(iteration)
    assert follower.watch.detector.checkpoints == list(range(100, 1001, 100))
    # each save let the older ones go but the newest and the one a rewind would load (the newest too, here)
    assert deleted == list(range(100, 1000, 100)) and follower.request().checkpoints == []


@pytest.mark.config
def test_a_retention_that_could_delete_nothing_or_keeps_less_than_it_says_is_refused(write, project):
    def load(retention: str, args: str = "train_iters: 1000, save_interval: 100") -> str | None:
        path = write(
            "config/sweeps/r.yaml",
            f"""
            defaults: [{{platform: mini}}]
            project: {{name: p, base_output_dir: /r}}
            backend: {{args: {{{args}}}}}
            retention: {retention}
            """,
        )
        try:
            return str(load_sweep(path).experiments[0].config.retention)
        except ConfigError as exc:
            return str(exc)

    assert load("null") == "None" and load("{}") == "RetentionConfig(keep_last=2, keep_every=0)"
    assert "retention.keep_last: must be at least 1: the newest checkpoint stays" in load("{keep_last: 0}")
    assert "retention.keep_every: must be >= 0" in load("{keep_every: -100}")
    assert "250 is no multiple of backend.args.save_interval (100): only checkpoints at multiples of 500" in load(
        "{keep_every: 250}"
    )
    assert load("{keep_every: 500}") == "RetentionConfig(keep_last=2, keep_every=500)"
    assert "backend.args.save_interval is not set: one is saved" in load("{}", "train_iters: 1000, save_interval: null")
    assert "unknown key (did you mean 'keep_last'?)" in load("{kep_last: 3}")


@pytest.mark.cli
def test_plan_shows_the_checkpoints_a_training_holds_and_their_size(write, project, capsys):
    """`plan` on the 50M preset (its layers counted exactly: tests/unit/test_checkpoint_size.py): every save
    without retention, at most what retention keeps with it, a cooldown's branch point held."""
    from airflow_oellm.cli import main as cli

    path = write(
        "config/sweeps/d.yaml",
        """
        defaults: [{platform: mini}, {model: 50M}]
        project: {name: d, base_output_dir: /r}
        backend: {args: {train_iters: 1000, save_interval: 100, bf16: true, padded_vocab_size: 50304}}
        cooldowns: [{at: 300}]
        """,
    )
    assert cli(["plan", str(path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    size = row["checkpoints"]["bytes_each"]
    assert row["checkpoints"]["saved"] == 10 and row["checkpoints"]["held_at_most"] == 10
    assert size == 14 * parameter_count(dict(load_sweep(path).experiments[0].config.backend.args))[0]
    assert cli(["plan", str(path), "+retention={keep_last: 2}", "--json"]) == 0
    (kept,) = json.loads(capsys.readouterr().out)
    # the newest 2, the cooldown's 300 until it completes, and a rewind target among the older ones
    assert kept["checkpoints"]["held_at_most"] == 4 and kept["checkpoints"]["bytes_at_most"] == 4 * size
    assert cli(["plan", str(path), "+retention={keep_last: 2}"]) == 0
    assert f"4 of 10 x {human_bytes(size)} = {human_bytes(4 * size)}" in capsys.readouterr().out
