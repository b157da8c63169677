"""The shared poller on the real cluster: one status command per cycle for many jobs, and survival of
SSH outages without a false final state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from airflow_oellm.hooks import AsyncSlurmHook
from airflow_oellm.slurm.states import JobState
from airflow_oellm.triggers.poller import JobPoller

pytestmark = pytest.mark.hook

SSHD_PID = Path("/run/sshd-slurmdev.pid")
SSHD_CONFIG = "/etc/ssh/sshd_config_slurmdev"
JOB_INFO_RPC = re.compile(
    r"^\s+(REQUEST_JOB_INFO|REQUEST_JOB_INFO_SINGLE|REQUEST_JOB_USER_INFO)\s+\(\s*\d+\)\s+count:(\d+)", re.M
)


def submit_many(dev_cluster, count: int, *, held: bool = False, body: str = "sleep 3") -> list[str]:
    flag = "--hold " if held else ""
    out = dev_cluster.ssh(
        f"for i in $(seq {count}); do sbatch --parsable {flag}-o /dev/null --job-name=poll --wrap='{body}'; done"
    ).stdout
    ids = out.split()
    assert len(ids) == count
    return ids


def job_info_rpcs(dev_cluster) -> int:
    """slurmctld's own count of job-information requests (what squeue costs it)."""
    text = dev_cluster.ssh(["sdiag"]).stdout.split("Remote Procedure Call statistics by user")[0]
    return sum(int(m.group(2)) for m in JOB_INFO_RPC.finditer(text))


async def watch_all(poller: JobPoller, ids: list[str], until, timeout: float):
    """Watch every id until `until(updates_by_id)` holds; returns all updates per id."""
    updates: dict[str, list] = {j: [] for j in ids}
    done = asyncio.Event()

    async def one(job_id: str):
        async for update in poller.watch(job_id):
            updates[job_id].append(update)
            if until(updates):
                done.set()

    tasks = [asyncio.create_task(one(j)) for j in ids]
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return updates


def test_fifty_jobs_cost_one_status_command_per_cycle(dev_cluster, slurm_conn_id):
    ids = submit_many(dev_cluster, 50, held=True)
    hooks = []

    def factory():
        hooks.append(AsyncSlurmHook(ssh_conn_id=slurm_conn_id))
        return hooks[-1]

    async def scenario():
        poller = JobPoller(factory, key="test-batching", interval=1.0, first_check_after=0.2)
        before = job_info_rpcs(dev_cluster)
        updates = await watch_all(poller, ids, lambda u: all(len(v) >= 3 for v in u.values()), timeout=60)
        after = job_info_rpcs(dev_cluster)
        return poller, updates, after - before

    poller, updates, rpcs = asyncio.run(scenario())
    assert len(hooks) == 1 and hooks[0].connects == 1  # one connection for all 50 watchers
    cycles = poller.cycles
    assert cycles >= 3
    # every cycle: exactly one command (one squeue for the 50 ids), no sacct (nothing ended)
    assert hooks[0].counts == {"poll": cycles}
    assert all(u.status.state is JobState.PENDING for v in updates.values() for u in v)
    # slurmctld agrees: one job-information RPC per cycle (sdiag runs between, not counted)
    assert rpcs == cycles, (rpcs, cycles)
    dev_cluster.ssh(["scancel", *ids])


def test_fifty_real_jobs_run_to_completion_through_one_poller(dev_cluster, slurm_conn_id):
    ids = submit_many(dev_cluster, 50, body="sleep 2")
    hooks = []

    def factory():
        hooks.append(AsyncSlurmHook(ssh_conn_id=slurm_conn_id))
        return hooks[-1]

    async def scenario():
        poller = JobPoller(factory, key="test-fifty", interval=2.0, first_check_after=0.5)
        updates = await watch_all(
            poller, ids, lambda u: all(v and v[-1].status and v[-1].status.is_terminal for v in u.values()), 180
        )
        return poller, updates

    poller, updates = asyncio.run(scenario())
    final = {j: v[-1].status for j, v in updates.items()}
    assert {s.state for s in final.values()} == {JobState.COMPLETED}
    assert all(s.exit_code == 0 for s in final.values())
    assert sum(h.connects for h in hooks) == 1
    total = sum(h.commands_run for h in hooks)
    assert total <= 2 * poller.cycles  # at most one squeue + one sacct per cycle, whatever the job count


def sshd_pid() -> int:
    return int(SSHD_PID.read_text().strip())


def kill_sshd_and_sessions() -> None:
    pid = sshd_pid()
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in [pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def start_sshd() -> None:
    os.makedirs("/run/sshd", exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-f", SSHD_CONFIG, "-E", "/var/log/slurm/sshd.log"], check=True)


def test_poller_survives_an_ssh_outage_without_a_false_final_state(dev_cluster, slurm_conn_id):
    [job] = submit_many(dev_cluster, 1, body="sleep 300")
    hooks = []

    def factory():
        hooks.append(AsyncSlurmHook(ssh_conn_id=slurm_conn_id))
        return hooks[-1]

    async def scenario():
        poller = JobPoller(factory, key="test-outage", interval=1.0, first_check_after=0.2, failure_threshold=2)
        updates = []
        outage = {"started": None, "ended": None}

        async def watch():
            async for update in poller.watch(job):
                updates.append((time.monotonic(), update))
                running = update.status is not None and update.status.state is JobState.RUNNING
                if running and outage["started"] is None:
                    kill_sshd_and_sessions()
                    outage["started"] = time.monotonic()
                elif outage["started"] and not outage["ended"] and time.monotonic() - outage["started"] > 4:
                    start_sshd()  # two and more poll intervals later
                    outage["ended"] = time.monotonic()
                elif outage["ended"] and running:
                    return

        try:
            await asyncio.wait_for(watch(), 120)
        finally:
            if outage["started"] and not outage["ended"]:
                start_sshd()
        return poller, updates, outage

    try:
        poller, updates, outage = asyncio.run(scenario())
    finally:
        subprocess.run(["bash", "scripts/dev-cluster.sh", "status"], capture_output=True)
    during = [u for t, u in updates if outage["started"] < t < outage["ended"]]
    assert during and all(u.status is None and u.error for u in during)  # errors, never a state
    assert all(u.consecutive_failures >= 2 for u in during)  # surfaced only after the threshold
    assert not any(u.status and u.status.is_terminal for _, u in updates)
    assert updates[-1][1].status.state is JobState.RUNNING  # recovered, job untouched
    assert poller.failed_cycles >= 2 and len(hooks) >= 1
    dev_cluster.ssh(["scancel", job])
