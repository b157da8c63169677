"""ClusterTarget: the one value naming where jobs run, from the platform config through tasks, triggers and hooks."""

from __future__ import annotations

import pytest
from airflow.exceptions import AirflowProviderDeprecationWarning

from airflow_oellm.hooks.slurm import AsyncSlurmHook, SlurmHook
from airflow_oellm.operators.submit import SlurmSubmitOperator
from airflow_oellm.sensors.checkpoint import CheckpointSensor
from airflow_oellm.slurm.target import ClusterTarget

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("target", "key", "described"),
    [
        (ClusterTarget("lumi"), "ssh:lumi", "SLURM over SSH (lumi)"),
        (ClusterTarget(), "ssh:ssh_default", "SLURM over SSH (ssh_default)"),
        (ClusterTarget("lumi", local_commands=True), "local-commands", "SLURM with this machine's shell"),
        (ClusterTarget(batch_system="local-process"), "local-process", "local processes on this machine (no SLURM)"),
    ],
)
def test_each_place_has_one_spelling(target, key, described):
    assert target.key == key and target.describe() == described
    assert ClusterTarget.of(target.as_dict()) == target == ClusterTarget.of(target)


def test_local_targets_carry_no_connection_and_local_processes_run_commands_locally():
    assert ClusterTarget("lumi", local_commands=True) == ClusterTarget(None, local_commands=True)
    assert ClusterTarget("lumi", local_commands=True).ssh_conn_id is None
    assert ClusterTarget(batch_system="local-process").local_commands is True


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_system": "pbs"}, "unknown batch_system 'pbs'; use one of slurm, local-process"),
        ({"ssh_conn_id": None}, "needs an ssh_conn_id, or local_commands=True"),
        ({"ssh_conn_id": ""}, "needs an ssh_conn_id, or local_commands=True"),
    ],
)
def test_a_target_that_names_no_place_is_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        ClusterTarget(**arguments)


def test_ssh_conn_id_is_the_shorthand_and_cannot_contradict_cluster():
    local = ClusterTarget(local_commands=True)
    assert ClusterTarget.choose("lumi", None) == ClusterTarget("lumi")
    assert ClusterTarget.choose("ssh_default", local) == ClusterTarget.choose(None, local) == local
    assert ClusterTarget.choose("lumi", ClusterTarget("lumi")) == ClusterTarget("lumi")
    with pytest.raises(ValueError, match=r"give ssh_conn_id='lumi' or cluster=.*, not both"):
        ClusterTarget.choose("lumi", local)


def test_hooks_are_built_from_the_target():
    local = ClusterTarget(batch_system="local-process")
    assert SlurmHook(cluster=local).cluster == AsyncSlurmHook(cluster=local).cluster == local
    assert SlurmHook("lumi").cluster == AsyncSlurmHook("lumi").cluster == ClusterTarget("lumi")
    assert SlurmHook("lumi").ssh_conn_id == "lumi" and SlurmHook(cluster=local).ssh_conn_id is None


def test_tasks_take_ssh_conn_id_or_cluster():
    script = {"script": "#!/bin/bash\ntrue\n", "output_dir": "/o"}
    assert SlurmSubmitOperator(task_id="a", ssh_conn_id="lumi", **script).cluster == ClusterTarget("lumi")
    local = ClusterTarget(local_commands=True)
    assert SlurmSubmitOperator(task_id="b", cluster=local, **script).cluster == local
    sensor = CheckpointSensor(task_id="c", checkpoint_dir="/o/c", iteration=10, cluster=local)
    assert sensor.cluster == local
    assert sensor._trigger({"ti": type("TI", (), {"run_id": "r"})()}).cluster == local  # into its trigger


@pytest.mark.parametrize(
    ("old", "target"),
    [
        ({"local": True}, ClusterTarget(local_commands=True)),
        ({"batch_system": "local-process"}, ClusterTarget(batch_system="local-process")),
        ({"ssh_conn_id": "lumi", "local": False, "batch_system": "slurm"}, ClusterTarget("lumi")),
    ],
)
def test_the_arguments_of_0_1_still_work_for_a_release_with_a_warning(old, target):
    with pytest.warns(AirflowProviderDeprecationWarning, match="deprecated: pass cluster=ClusterTarget"):
        task = CheckpointSensor(task_id="c", checkpoint_dir="/o/c", iteration=10, **old)
    assert task.cluster == target


def test_old_and_new_arguments_together_are_refused():
    with pytest.raises(ValueError, match="give cluster= alone, without local="):
        CheckpointSensor(task_id="c", checkpoint_dir="/o/c", iteration=10, cluster=ClusterTarget("x"), local=True)
