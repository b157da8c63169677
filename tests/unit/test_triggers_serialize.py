"""Triggers rebuild from what they serialize (the triggerer re-creates them from the database), and hold
an event that comes too soon after the deferral."""

from __future__ import annotations

import asyncio
import importlib
import json
import time

import pytest
from airflow.triggers.base import TriggerEvent

from airflow_oellm.config.schema import AnomaliesConfig
from airflow_oellm.get_provider_info import get_provider_info
from airflow_oellm.monitor.anomalies import AnomalySettings
from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers import CheckpointTrigger, LogEventTrigger, SlurmJobTrigger
from airflow_oellm.triggers.base import (
    DEFAULT_DEFER_SETTLE_SECONDS,
    ClusterTrigger,
    defer_settle_seconds,
    settle_deadline,
)

pytestmark = pytest.mark.operators


def test_the_anomaly_settings_survive_serialization_and_an_older_trigger_gets_the_defaults():
    settings = AnomalySettings.from_config(AnomaliesConfig(rewind_margin=50, grad_norm_spike=None))
    kwargs = SlurmJobTrigger(
        job_id="12", log_path="/l", state_path="/s", cluster=ClusterTarget("lumi"), anomalies=settings.to_dict()
    ).serialize()[1]
    assert AnomalySettings.from_dict(json.loads(json.dumps(kwargs))["anomalies"]) == settings
    del kwargs["anomalies"]  # serialized by a version without them
    assert AnomalySettings.from_dict(SlurmJobTrigger(**kwargs).anomalies) == AnomalySettings.from_config()


@pytest.mark.parametrize(
    "trigger",
    [
        SlurmJobTrigger(
            job_id="12",
            log_path="/o/logs/x-12.out",
            state_path="/o/.oellm/monitor/a-1.json",
            cluster=ClusterTarget("lumi"),
            events=[{"name": "e", "pattern": "x"}],
            inactivity_threshold=600,
            nan_limit=3,
            anomalies=AnomalySettings.from_config(AnomaliesConfig(rewind_margin=50, grad_norm_spike=None)).to_dict(),
            output_paths=["/o/checkpoints/latest_checkpointed_iteration.txt"],
            poll_interval=30,
            progress_to={"dag_id": "d", "run_id": "r", "task_id": "train", "map_index": -1},
        ),
        CheckpointTrigger(
            checkpoint_dir="/o/checkpoints",
            iteration=5000,
            at_least=True,
            training_status_path="/o/.oellm/status/train.json",
            run_id="manual__1",
            cluster=ClusterTarget(local_commands=True),
        ),
        LogEventTrigger(
            event="iteration",
            condition="iteration >= 50000",
            training_status_path="/o/s.json",
            run_id="r",
            inactivity_threshold=900,
            cluster=ClusterTarget(batch_system="local-process"),
        ),
    ],
    ids=lambda t: type(t).__name__,
)
def test_round_trip(trigger):
    classpath, kwargs = trigger.serialize()
    json.dumps(kwargs)  # stored as JSON by Airflow
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert rebuilt.cluster == trigger.cluster and rebuilt.hook().cluster == trigger.cluster


@pytest.mark.parametrize(
    ("before", "cluster"),
    [
        ({"ssh_conn_id": "lumi", "local": False, "batch_system": "slurm"}, ClusterTarget("lumi")),
        ({"ssh_conn_id": "ssh_default", "local": True, "batch_system": "slurm"}, ClusterTarget(local_commands=True)),
        ({"ssh_conn_id": None, "batch_system": "local-process"}, ClusterTarget(batch_system="local-process")),
    ],
)
def test_a_trigger_serialized_before_the_cluster_target_still_resumes(before, cluster):
    """A triggerer upgraded under deferred tasks rebuilds their triggers from the 0.1 arguments."""
    kwargs = {"job_id": "7", "log_path": "/o/l-7.out", "state_path": "/o/s.json", "poll_interval": 5, **before}
    trigger = SlurmJobTrigger(**kwargs)
    assert trigger.cluster == cluster
    assert trigger.serialize()[1]["cluster"] == cluster.as_dict()
    with pytest.raises(TypeError, match="unexpected trigger arguments: batch_sytem"):
        SlurmJobTrigger(**{**kwargs, "batch_sytem": "slurm"})


class _Immediate(ClusterTrigger):
    async def watch(self):
        yield TriggerEvent({"kind": "ready"})


@pytest.mark.parametrize("hold", [None, 0.6])
def test_an_event_is_held_until_fire_after(hold):
    """A trigger may not fire before the deferring worker is surely gone (see `defer_settle_seconds`)."""
    started = time.time()
    trigger = _Immediate(
        cluster=ClusterTarget(local_commands=True), poll_interval=1, fire_after=started + hold if hold else None
    )

    async def first():
        async for event in trigger.run():
            return event, time.time() - started

    event, waited = asyncio.run(first())
    assert event.payload == {"kind": "ready"}
    assert waited >= hold if hold else waited < 0.3


def test_the_settle_hold_is_a_setting(monkeypatch):
    assert defer_settle_seconds() == DEFAULT_DEFER_SETTLE_SECONDS == 15.0
    monkeypatch.setenv("AIRFLOW__OELLM__DEFER_SETTLE_SECONDS", "2.5")
    assert defer_settle_seconds() == 2.5
    assert 2.4 < settle_deadline() - time.time() <= 2.5
    monkeypatch.setenv("AIRFLOW__OELLM__DEFER_SETTLE_SECONDS", "0")
    assert defer_settle_seconds() == 0
    for bad in ("-1", "inf", "nan"):
        monkeypatch.setenv("AIRFLOW__OELLM__DEFER_SETTLE_SECONDS", bad)
        with pytest.raises(ValueError, match=r"\[oellm\] defer_settle_seconds must be .* >= 0, not "):
            settle_deadline()


def test_the_providers_settings_are_airflows():
    """`airflow config` knows the provider's section, with the defaults the code falls back to."""
    options = get_provider_info()["config"]["oellm"]["options"]
    assert float(options["defer_settle_seconds"]["default"]) == DEFAULT_DEFER_SETTLE_SECONDS
    assert options["sweeps_path"]["default"] == ""
