"""A killed task's job is cancelled even though the triggerer keeps cancelling the trigger meanwhile.

Driven by Airflow's own `TriggerRunner.run_trigger` and `cancel_triggers`, on a real job of the
local-process batch system. Under load, the API server's answer to "what state is the task in" took longer
than the triggerer's loop (about a second); here it takes 0.5 s and the loop repeats the cancel 5 or 50 times
meanwhile. The real triggerer and SSH: tests/e2e/test_stack.py::test_marking_a_deferred_task_failed_cancels_its_job.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from airflow.jobs.triggerer_job_runner import TriggerRunner

from airflow_oellm.hooks.slurm import SlurmHook
from airflow_oellm.slurm.states import JobState
from airflow_oellm.slurm.target import ClusterTarget
from airflow_oellm.triggers.job import SlurmJobTrigger
from tests.unit.test_localjobs import hook, queue, script, wait_state  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.operators, pytest.mark.hook]

LOCAL = ClusterTarget(batch_system="local-process")
ANSWER_SECONDS = 0.5


class SlowlyAnswered(SlurmJobTrigger):
    """The task's state comes as slowly as from an API server under load."""

    async def _task_state(self) -> str | None:
        await asyncio.sleep(ANSWER_SECONDS)  # the API server's answer under load
        return "failed"


async def kill_as_the_triggerer_does(trigger: SlurmJobTrigger, every: float) -> float:
    """Run the trigger, then cancel it as a user action, and again every `every` seconds until it has ended
    (Airflow's loop does so about every second while the trigger is in its cancelling set)."""
    runner = TriggerRunner()
    task = asyncio.create_task(runner.run_trigger(1, trigger))
    runner.triggers[1] = {"task": task, "name": "train", "events": 0, "is_watcher": False}
    await asyncio.sleep(1.0)  # the trigger polls its job
    assert not task.done()
    started = time.monotonic()
    while not task.done():
        runner.to_cancel.append(1)
        await runner.cancel_triggers()
        await asyncio.sleep(every)  # the triggerer's loop, here faster than the answer
    with pytest.raises(asyncio.CancelledError):
        task.result()
    return time.monotonic() - started


@pytest.mark.parametrize("every", [0.01, 0.1])
def test_a_killed_tasks_job_is_cancelled_though_the_trigger_is_cancelled_again_meanwhile(
    hook: SlurmHook,  # noqa: F811  (the fixture imported above)
    script,  # noqa: F811
    tmp_path: Path,
    every: float,
):
    job_id = hook.submit_unreconciled(script("sleep 300", name="killed"))[0]
    wait_state(hook, job_id, lambda s: s is JobState.RUNNING)
    trigger = SlowlyAnswered(
        job_id=job_id,
        log_path=str(tmp_path / f"killed-{job_id}.out"),
        state_path=str(tmp_path / "state.json"),
        cluster=LOCAL,
        poll_interval=0.2,
    )

    async def scenario() -> JobState:
        await kill_as_the_triggerer_does(trigger, every)
        # the triggerer's event loop goes on after the trigger ended: so does the cancel on_kill started
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = (await asyncio.to_thread(hook.job_status, job_id)).state
            if state.is_terminal:
                return state
            await asyncio.sleep(0.2)  # poll
        return state

    assert asyncio.run(scenario()) is JobState.CANCELLED
