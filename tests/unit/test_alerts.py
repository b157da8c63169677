"""A sweep's alerts: what they say, who hears them (a webhook receiver on 127.0.0.1 records what it gets), and a
notifier that cannot work refused or logged, never failing the task."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
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


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


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
