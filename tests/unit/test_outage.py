"""Outages by kind, in the words a waiting task uses (airflow_oellm/monitor/outage.py)."""

from __future__ import annotations

import importlib
import logging

import pytest
from airflow.sdk.bases.notifier import BaseNotifier
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.monitor.outage import (
    AUTHENTICATION,
    HOST_KEY,
    NETWORK,
    OTHER,
    SCHEDULER,
    Outage,
    max_outage_seconds,
    outage_kind,
)
from airflow_oellm.notifications import tell


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        # asyncssh (the triggers) and paramiko (the workers), as the hooks wrap them
        ("cannot connect to lumi: Permission denied for user alice on host lumi.csc.fi", AUTHENTICATION),
        ("cannot connect to leonardo: Authentication failed.", AUTHENTICATION),
        ("cannot connect to leonardo: certificate has expired", AUTHENTICATION),
        ("cannot connect to juwels: Host key is not trusted for host juwels.fz-juelich.de", HOST_KEY),
        ("cannot connect to lumi: [Errno 111] Connect call failed ('10.0.0.1', 22)", NETWORK),
        ("cannot connect to lumi: ", NETWORK),  # asyncio's timeout has no message
        ("SSH failure: Connection lost", NETWORK),
        ("squeue failed (exit 1): slurm_load_jobs error: Socket timed out on send/recv operation", SCHEDULER),
        ("sacct failed (exit 1): sacct: error: Problem talking to the database", SCHEDULER),
        ("read failed (exit 2): no space left", OTHER),
        # a command that ran: the login worked, a file's permission is no certificate to renew
        ("read failed (exit 1): cat: /scratch/proj/run/train.log: Permission denied", OTHER),
        ("squeue failed (exit 1): squeue: error: Invalid user: certificate", SCHEDULER),
    ],
)
def test_errors_are_told_apart_by_kind(error, kind):
    assert outage_kind(error) == kind


def test_the_message_says_since_when_why_and_what_to_do():
    outage = Outage("leonardo", 1_800_000_000.0, "cannot connect to leonardo: Permission denied", 4)
    text = outage.message(1_800_000_000.0 + 3 * 3600 + 120)
    assert text.startswith("cannot reach leonardo since 2027-01-15 08:00 UTC (3 h 02 min): authentication failed")
    assert "renew your SSH certificate or key" in text and text.endswith("Last error: " + outage.error)
    assert outage.to_dict(1_800_000_060.0)["seconds"] == 60.0


@given(st.text(max_size=300), st.floats(0, 1e10), st.floats(0, 1e10))
def test_any_error_text_makes_a_message(error, since, now):
    outage = Outage("c", since, error)
    assert outage.kind in (AUTHENTICATION, HOST_KEY, NETWORK, SCHEDULER, OTHER)
    assert outage.message(max(now, since)).startswith("cannot reach c since ")


def test_max_outage_takes_seconds_slurm_times_and_unlimited():
    assert max_outage_seconds(90) == 90.0
    assert max_outage_seconds("1-12:00:00") == 36 * 3600.0
    assert max_outage_seconds("UNLIMITED") is None


def test_a_bad_max_outage_is_refused_by_key(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "defaults: [{platform: devcluster}]\nproject: {name: s, base_output_dir: /tmp/o}\n"
        "backend: {name: command, command: ['true']}\nplatform: {max_outage: two days}\n"
    )
    with pytest.raises(ConfigError, match=r"platform\.max_outage.*invalid SLURM time 'two days'"):
        load_sweep(sweep)


def test_the_callback_hears_of_an_outage_once_it_lasted_then_of_its_end():
    from airflow_oellm.monitor.events import event_specs
    from airflow_oellm.monitor.watch import JobFollower
    from airflow_oellm.slurm.commands import FileChunk
    from airflow_oellm.slurm.operations import PollUpdate

    follow = JobFollower(
        "7",
        "/log",
        "/state",
        event_specs(),
        inactivity_threshold=None,
        nan_limit=0,
        cluster_name="lumi",
        max_outage=3600,
        notify_outage_after=900,
    )
    follow.on_update(PollUpdate("7", None, 1, chunks=(FileChunk("/state", 0, None, b""),)), 0)
    refused = PollUpdate("7", None, 2, "Permission denied", 1, permanent=True, failing_since=95.0)
    assert follow.on_update(refused, 100).notify is None  # a blip is nobody's business
    assert follow.outage.since == 95.0  # the poller's first failed cycle, shared by all its jobs
    started = follow.on_update(refused, 995).notify
    assert started["event"] == "started" and started["outage"]["kind"] == "authentication"
    assert started["message"].startswith("cannot reach lumi since 1970-01-01 00:01 UTC (15 min)")
    assert follow.on_update(refused, 1500).notify is None  # told once
    ended = follow.on_update(PollUpdate("7", None, 3, chunks=(FileChunk("/log", 0, 0, b""),)), 2000)
    assert (
        ended.notify["event"] == "ended"
        and ended.notify["message"] == "reached lumi again after 31 min without contact"
    )
    # an outage that ends before it lasted is never told, at its start or its end
    follow.on_update(PollUpdate("7", None, 2, "Permission denied", 1, permanent=True, failing_since=3000.0), 3000)
    assert follow.on_update(PollUpdate("7", None, 4, chunks=(FileChunk("/log", 0, 0, b""),)), 3100).notify is None
    gave_up = follow.on_update(PollUpdate("7", None, 5, "timed out", 9, failing_since=5000.0), 8700)
    assert gave_up.error and gave_up.notify["event"] == "gave_up"
    quiet = JobFollower("7", "/log", "/state", event_specs(), inactivity_threshold=None, nan_limit=0, max_outage=10)
    assert quiet.on_update(PollUpdate("7", None, 1, "timed out", 9), 100).notify is None  # no callback configured


def test_each_outage_and_event_is_told_once_per_process(caplog):
    from airflow_oellm.notifications import first_to_tell, notifier_callable, tell

    notice = {"event": "started", "message": "m", "outage": {"since": 12.5}}
    assert first_to_tell("x.y", "ssh:lumi", notice)
    assert not first_to_tell("x.y", "ssh:lumi", notice)
    assert first_to_tell("x.y", "ssh:leonardo", notice) and first_to_tell(
        "x.y", "ssh:lumi", {**notice, "event": "ended"}
    )
    with pytest.raises(ImportError, match=r"platform\.on_outage\.callback: cannot import no_such\.module"):
        notifier_callable("no_such.module")
    with pytest.raises(ImportError, match=r"json\.__doc__ is a str, not a callable"):
        notifier_callable("json.__doc__")
    tell("tests.unit.test_outage.record", notice, logging.getLogger("t"))
    # the callback's module as the import system knows it (pytest may have imported this file apart)
    assert importlib.import_module("tests.unit.test_outage").TOLD[-1] == notice
    tell("tests.unit.test_outage.broken", notice, logging.getLogger("t"))  # its failure is only logged
    assert "failed on started: boom" in caplog.text


TOLD: list = []


class Recorder(BaseNotifier):
    template_fields = ("text",)

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def notify(self, context) -> None:
        TOLD.append(self.text)


notifier = Recorder("{{ outage.cluster }}: {{ message }}")


def test_a_long_running_triggerer_remembers_only_the_latest_notices_it_told(monkeypatch):
    from airflow_oellm import notifications
    from airflow_oellm.notifications import first_to_tell

    monkeypatch.setattr(notifications, "_told", {})
    for since in range(notifications.TOLD_REMEMBERED + 5):
        assert first_to_tell("x.y", "ssh:lumi", {"event": "started", "outage": {"since": float(since)}})
    assert len(notifications._told) == notifications.TOLD_REMEMBERED
    latest = {"event": "started", "outage": {"since": float(notifications.TOLD_REMEMBERED + 4)}}
    assert not first_to_tell("x.y", "ssh:lumi", latest)  # still remembered: told once
    oldest = {"event": "started", "outage": {"since": 0.0}}
    assert first_to_tell("x.y", "ssh:lumi", oldest)  # forgotten first


def test_an_airflow_notifier_renders_each_notice_from_its_template():
    module = importlib.import_module("tests.unit.test_outage")
    for message in ("first", "second"):
        notice = {"event": "started", "message": message, "outage": {"since": 1.0, "cluster": "lumi"}}
        tell("tests.unit.test_outage.notifier", notice, logging.getLogger("t"))
    assert module.TOLD[-2:] == ["lumi: first", "lumi: second"]


def record(notice):
    TOLD.append(notice)


def broken(notice):
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("platform", "message"),
    [
        ("{on_outage: {after: 60}}", r"platform\.on_outage\.after.*notifies nobody"),
        ("{on_outage: {callback: 'not a path'}}", r"platform\.on_outage\.callback.*dotted path"),
        ("{on_outage: {callback: lab.alerts.slack, after: soon}}", r"platform\.on_outage\.after.*invalid SLURM time"),
        ("{on_outage: {callback: lab.alerts.slack, after: UNLIMITED}}", r"platform\.on_outage\.after.*never tell"),
    ],
)
def test_an_outage_callback_that_cannot_work_is_refused_by_key(tmp_path, platform, message):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "defaults: [{platform: devcluster}]\nproject: {name: s, base_output_dir: /tmp/o}\n"
        f"backend: {{name: command, command: ['true']}}\nplatform: {platform}\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep)
