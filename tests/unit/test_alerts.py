"""A sweep's alerts: what they say, who hears them (a webhook receiver on 127.0.0.1 records what it gets), and a
notifier that cannot work refused or logged, never failing the task."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.notifications import EVENTS, Alert, deliver
from tests.conftest import REPO

pytestmark = [pytest.mark.unit, pytest.mark.alerts]


def record(context: dict[str, Any]) -> None:
    """A notifier function, as a lab would write one (dotted path: tests.unit.test_alerts.record); imported by
    path it may be another copy of this module, so it appends to the file the test names."""
    with open(os.environ["OELLM_TEST_TOLD"], "a") as told:
        told.write(json.dumps(context) + "\n")


def test_an_alert_is_one_short_line_with_the_experiment_the_reason_and_the_link():
    alert = Alert("training_fatal", "dash1", "lr0.01", "job 12 FAILED: " + "x" * 400, "http://a/oellm/experiments/d")
    line = alert.message
    assert line.startswith("[oellm] dash1/lr0.01: training failed: job 12 FAILED: xxx")
    assert line.endswith("… http://a/oellm/experiments/d") and "\n" not in line and len(line) < 400
    finished = Alert("sweep_finished", "dash1", None, "success 2", None, "| a |\n|---|\n| 1 |\n")
    assert finished.message == "[oellm] dash1: sweep finished: success 2\n```\n| a |\n|---|\n| 1 |\n```"


def test_each_notifier_hears_the_events_it_lists_and_one_that_fails_is_logged_not_raised(
    receiver, caplog, tmp_path, monkeypatch
):
    monkeypatch.setenv("OELLM_TEST_TOLD", str(tmp_path / "told.jsonl"))
    notify = [
        {"webhook": receiver.url, "events": ["training_fatal"]},
        {"notifier": "tests.unit.test_alerts.record", "events": []},  # everything
        {"notifier": "no_such_module.notify"},
        {"webhook": "http://127.0.0.1:9/refused"},
    ]
    fatal = Alert("training_fatal", "s", "e", "job 1 FAILED", "http://x/y")
    with caplog.at_level(logging.INFO):
        assert deliver(fatal, notify, logging.getLogger("t")) == 2
        assert deliver(Alert("sweep_finished", "s", None, "success 1"), notify, logging.getLogger("t")) == 1
    assert [r["text"] for r in receiver.received] == [fatal.message]  # the webhook heard only what it listed
    assert receiver.received[0]["alert"]["event"] == "training_fatal"
    told = [json.loads(line) for line in (tmp_path / "told.jsonl").read_text().splitlines()]
    assert [c["alert"]["event"] for c in told] == ["training_fatal", "sweep_finished"]
    assert told[0]["message"] == fatal.message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("notifications.notify: cannot import no_such_module.notify" in w for w in warnings), warnings
    assert any(w.startswith("notifications: notify[3] webhook failed on training_fatal") for w in warnings)
    assert not any("127.0.0.1:9" in w for w in warnings)  # a webhook's URL is a secret: never logged


def test_a_webhook_reference_is_resolved_by_the_caller():
    seen = []

    def resolve(reference: str) -> str:
        seen.append(reference)
        return "http://127.0.0.1:9/x"

    deliver(Alert("stalled", "s", "e", "hang"), [{"webhook": "var:lab_hook"}], logging.getLogger("t"), resolve)
    assert seen == ["var:lab_hook"]


@pytest.mark.parametrize(
    ("notify", "key", "message"),
    [
        ("[{webhook: 'http://x', notifier: a.b}]", "notifications.notify[0]", "give one of webhook"),
        ("[{}]", "notifications.notify[0]", "give one of webhook"),
        ("[{webhook: hooks.slack.com/x}]", "notifications.notify[0].webhook", "expected an http(s) URL or a secret"),
        ("[{notifier: notify}]", "notifications.notify[0].notifier", "expected a dotted path"),
        ("[{webhook: 'http://x', args: {a: 1}}]", "notifications.notify[0].args", "nothing is made with it"),
        ("[{webhook: 'http://x', events: [training_fatl]}]", "notifications.notify[0].events[0]",
         "did you mean 'training_fatal'"),
    ],
)  # fmt: skip
def test_a_notifier_that_could_never_tell_anyone_is_refused_naming_its_key(notify, key, message):
    with pytest.raises(ConfigError) as raised:
        load_sweep(REPO / "examples" / "demo" / "demo.yaml", [f"+notifications={{notify: {notify}}}"])
    assert any(i.key == key and message in i.message for i in raised.value.issues), raised.value.issues


def test_the_sweep_dag_tells_its_notifiers_when_it_finishes_and_the_events_are_the_documented_ones():
    from airflow_oellm.dag_factory import sweep_dag

    sweep = load_sweep(REPO / "examples" / "demo" / "demo.yaml", ["+notifications={notify: [{webhook: 'var:hook'}]}"])
    summary = sweep_dag(sweep).get_task("summary")
    assert summary.sweep == "demo" and summary.notifications["notify"][0]["webhook"] == "var:hook"
    assert sweep_dag(load_sweep(REPO / "examples" / "demo" / "demo.yaml")).get_task("summary").notifications is None
    documented = (REPO / "docs" / "configuration.md").read_text()
    assert all(f"`{event}`" in documented for event in EVENTS)


def test_an_outage_alerts_the_notifiers_that_hear_of_outages_once_per_outage(receiver, caplog):
    from airflow_oellm.hooks.alerting import OutageAlerts
    from airflow_oellm.monitor.attempts import job_settings
    from airflow_oellm.monitor.outage import Outage, outage_notice
    from airflow_oellm.notifications import first_to_tell
    from airflow_oellm.slurm.target import ClusterTarget
    from airflow_oellm.triggers.job import SlurmJobTrigger

    def experiment(events: str) -> dict[str, Any]:
        notify = (
            f"+notifications={{notify: [{{webhook: '{receiver.url}', events: {events}}}], dashboard_url: 'http://a/o'}}"
        )
        return load_sweep(REPO / "examples" / "demo" / "demo.yaml", [notify]).experiments[0].resolved

    hearing, deaf = experiment("[outage]"), experiment("[training_fatal]")
    # no platform.on_outage.callback: the alert alone makes the watch notice an outage, after on_outage.after
    assert job_settings(experiment=hearing, job=None, task_id="train").notify_outage_after == 900  # its default
    assert job_settings(experiment=deaf, job=None, task_id="train").notify_outage_after is None
    cfg = job_settings(experiment=hearing, job=None, task_id="train").config
    alerts = OutageAlerts.of(cfg.notifications, "demo")
    assert alerts is not None and alerts.link == "http://a/o/sweeps/demo"
    deaf_cfg = job_settings(experiment=deaf, job=None, task_id="train").config
    assert OutageAlerts.of(deaf_cfg.notifications, "demo") is None
    # it travels with the trigger
    trigger = SlurmJobTrigger(
        job_id="7", log_path="/l", state_path="/s", cluster=ClusterTarget("x"), poll_interval=5,
        outage_alerts=alerts.to_dict(),
    )  # fmt: skip
    rebuilt = SlurmJobTrigger(**trigger.serialize()[1])
    assert OutageAlerts.from_dict(rebuilt.outage_alerts) == alerts and rebuilt.notify_outage_after is None
    notice = outage_notice("started", Outage("lumi", 1000.0, "Permission denied (publickey)", 4), 1400.0)
    assert first_to_tell(alerts.key, "lumi-key", notice) and not first_to_tell(alerts.key, "lumi-key", notice)
    assert alerts.send(notice, logging.getLogger("t")) == 1
    (body,) = receiver.received
    assert body["alert"]["event"] == "outage" and body["alert"]["experiment"] is None
    assert body["text"] == f"[oellm] demo: cluster access: {notice['message']} http://a/o/sweeps/demo"
