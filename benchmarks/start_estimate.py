"""Benchmark: what a pending job's start estimate (`squeue --start`) costs slurmctld, against the status poll
alone, on the dev cluster.

    .venv/bin/python benchmarks/start_estimate.py [--pending 10 100] [--window 30] [--json OUT]

Needs the dev cluster (scripts/dev-cluster.sh up) to itself: it fills the node with one long job, then submits
N jobs that pend for Resources (the backfill scheduler plans a start for each), and times, over one SSH
connection, for `--window` seconds each, a poll every 0.5 s:
- the poll: `poll_cycle(ids)`, the one command the shared poller runs per cycle (squeue for N ids);
- the poll with the estimate: `poll_cycle(ids, start_of=ids)`, the same command with a `squeue --start` section.
For each: the client's seconds, slurmctld's job-information RPCs and their total server time (`sdiag`), and the
backfill scheduler's cycles meanwhile (does asking for starts make it plan more?). Everything is cancelled after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.status_poll import connection_env  # noqa: E402 - after the path

JOB_RPC = re.compile(
    r"^\s+(REQUEST_JOB_INFO|REQUEST_JOB_INFO_SINGLE|REQUEST_JOB_USER_INFO)\s+\(\s*\d+\)\s+count:(\d+)\s+"
    r"ave_time:\d+\s+total_time:(\d+)",
    re.M,
)
POLL_EVERY = 0.5  # seconds
BACKFILL_CYCLES = re.compile(r"Backfilling stats.*?Total cycles:\s+(\d+)", re.S)


async def slurmctld(conn) -> tuple[int, int, int]:
    """(job-information RPCs, their total microseconds, backfill cycles) so far."""
    out = (await conn.run("sdiag", check=True)).stdout
    by_type = out.split("Remote Procedure Call statistics by user")[0]
    found = JOB_RPC.findall(by_type)
    cycles = BACKFILL_CYCLES.search(out)
    return sum(int(c) for _, c, _ in found), sum(int(t) for _, _, t in found), int(cycles.group(1)) if cycles else 0


async def measure(n: int, window: float) -> dict:
    from airflow.providers.ssh.hooks.ssh import SSHHookAsync

    from airflow_oellm.hooks import AsyncSlurmHook
    from airflow_oellm.slurm.operations import CycleRequest

    conn = await SSHHookAsync(ssh_conn_id="slurm_bench").get_conn()
    cpus = (await conn.run("sinfo -h -o %c", check=True)).stdout.split()[0]
    blocker = (
        await conn.run(f"sbatch --parsable -c {cpus} -t 30 -o /dev/null --job-name=bench-fill --wrap='sleep 1800'")
    ).stdout.strip()
    out = await conn.run(
        f"for i in $(seq {n}); do sbatch --parsable -t 10 -o /dev/null --job-name=bench-wait --wrap=true; done",
        check=True,
    )
    ids = out.stdout.split()
    result: dict = {"pending": n}
    hook = AsyncSlurmHook(ssh_conn_id="slurm_bench")
    try:
        for _ in range(60):  # until the backfill scheduler has planned their starts
            first = await hook.poll_cycle(ids, CycleRequest(), start_of=ids)
            if first.start_estimates and all(first.start_estimates.get(j) for j in ids):
                break
            await asyncio.sleep(2)  # bf_interval
        result["estimated"] = sum(1 for j in ids if (first.start_estimates or {}).get(j))
        result["reasons"] = sorted({s.reason for s in first.statuses.values() if s.reason})
        for name, start_of in (("poll", ()), ("poll_with_estimate", ids)):
            seconds = []
            rpcs_before, micros_before, cycles_before = await slurmctld(conn)
            began = time.perf_counter()
            while time.perf_counter() - began < window:  # a poll every POLL_EVERY seconds, as a busy poller
                t = time.perf_counter()
                await hook.poll_cycle(ids, CycleRequest(), start_of=start_of)
                seconds.append(time.perf_counter() - t)
                await asyncio.sleep(max(POLL_EVERY - (time.perf_counter() - t), 0))
            elapsed = time.perf_counter() - began
            rpcs_after, micros_after, cycles_after = await slurmctld(conn)
            result[name] = {
                "polls": len(seconds),
                "seconds": statistics.median(seconds),
                "slurmctld_job_rpcs_per_poll": (rpcs_after - rpcs_before) / len(seconds),
                "slurmctld_job_rpc_ms_per_poll": (micros_after - micros_before) / len(seconds) / 1000,
                "backfill_cycles_per_minute": (cycles_after - cycles_before) / elapsed * 60,
            }
        poll, both = result["poll"], result["poll_with_estimate"]
        result["ratio_seconds"] = both["seconds"] / poll["seconds"]
        server = max(poll["slurmctld_job_rpc_ms_per_poll"], 1e-9)
        result["ratio_rpc_ms"] = both["slurmctld_job_rpc_ms_per_poll"] / server
    finally:
        await hook.close()
        for start in range(0, len(ids), 500):
            await conn.run(shlex.join(["scancel", *ids[start : start + 500]]))
        await conn.run(shlex.join(["scancel", blocker]))
        conn.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--window", type=float, default=30.0, help="seconds of polling per variant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    connection_env()
    results = [asyncio.run(measure(n, args.window)) for n in args.pending]
    for r in results:
        p, b = r["poll"], r["poll_with_estimate"]
        print(
            f"{r['pending']:>4} pending ({r['estimated']} estimated; {', '.join(r['reasons'])}): "
            f"poll {p['seconds'] * 1000:.0f} ms, {p['slurmctld_job_rpcs_per_poll']:.2f} RPC, "
            f"{p['slurmctld_job_rpc_ms_per_poll']:.2f} ms in slurmctld, {p['backfill_cycles_per_minute']:.1f} "
            f"backfill cycles/min | with squeue --start {b['seconds'] * 1000:.0f} ms, "
            f"{b['slurmctld_job_rpcs_per_poll']:.2f} RPC, {b['slurmctld_job_rpc_ms_per_poll']:.2f} ms, "
            f"{b['backfill_cycles_per_minute']:.1f} cycles/min | x{r['ratio_seconds']:.2f} time, "
            f"x{r['ratio_rpc_ms']:.2f} slurmctld time"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
