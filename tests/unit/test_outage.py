"""Outages by kind, in the words a waiting task uses (airflow_oellm/monitor/outage.py)."""

from __future__ import annotations

import pytest
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
