"""Benchmark: cost of one status poll for N jobs on the dev cluster, ours against two peers' patterns.

    .venv/bin/python benchmarks/status_poll.py [--jobs 1 10 100 500] [--repeat 3] [--json OUT]

Needs the dev cluster (scripts/dev-cluster.sh up). N held jobs are submitted (they use no CPU),
then one poll cycle is timed, over one SSH connection in every case:
- ours: `AsyncSlurmHook.job_statuses(ids)`, what the shared poller runs per cycle;
- per-job squeue (NeMo-Run polls each job with its own scheduler call);
- per-job, three commands (the SSH provider's SSHRemoteJobTrigger: completion check, size, tail).
Commands per cycle are counted, and slurmctld's own job-information RPCs are read from `sdiag`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STATE_DIR = Path(os.environ.get("SLURM_DEV_STATE_DIR", "/var/lib/slurm-dev"))
RPC = re.compile(
    r"^\s+(REQUEST_JOB_INFO|REQUEST_JOB_INFO_SINGLE|REQUEST_JOB_USER_INFO)\s+\(\s*\d+\)\s+count:(\d+)", re.M
)


def connection_env() -> None:
    env = dict(line.split("=", 1) for line in (STATE_DIR / "cluster.env").read_text().splitlines() if "=" in line)
    key = next(
        f"{p[1]} {p[2]}"
        for p in (line.split() for line in Path(env["SLURM_DEV_SSH_KNOWN_HOSTS"]).read_text().splitlines())
        if len(p) >= 3 and p[1] == "ssh-ed25519"
    )
    os.environ["AIRFLOW_CONN_SLURM_BENCH"] = json.dumps(
        {
            "conn_type": "ssh",
            "host": env["SLURM_DEV_SSH_HOST"],
            "port": int(env["SLURM_DEV_SSH_PORT"]),
            "login": env["SLURM_DEV_SSH_USER"],
            "extra": {"key_file": env["SLURM_DEV_SSH_KEY"], "host_key": key},
        }
    )
    os.environ.setdefault("AIRFLOW_HOME", "/tmp/oellm-bench-airflow-home")


async def rpcs(conn) -> int:
    out = (await conn.run("sdiag", check=True)).stdout.split("Remote Procedure Call statistics by user")[0]
    return sum(int(m.group(2)) for m in RPC.finditer(out))


async def measure(n: int, repeat: int) -> dict:
    from airflow.providers.ssh.hooks.ssh import SSHHookAsync

    from airflow_oellm.hooks import AsyncSlurmHook

    conn = await SSHHookAsync(ssh_conn_id="slurm_bench").get_conn()
    out = await conn.run(
        f"for i in $(seq {n}); do sbatch --parsable --hold -o /dev/null --job-name=bench --wrap=true; done", check=True
    )
    ids = out.stdout.split()
    log = "/dev/null"
    result: dict = {"jobs": n}
    try:
        hook = AsyncSlurmHook(ssh_conn_id="slurm_bench")
        await hook.job_statuses(ids[:1])  # connect outside the timing

        async def ours():
            await hook.job_statuses(ids)
            return 1

        async def per_job_squeue():
            for j in ids:
                await conn.run(shlex.join(["squeue", "--noheader", "--states=all", f"--jobs={j}", "--format=%T"]))
            return len(ids)

        async def per_job_three_commands():
            for j in ids:
                await conn.run(shlex.join(["squeue", "--noheader", "--states=all", f"--jobs={j}", "--format=%T"]))
                await conn.run(f"stat -c %s {log}")
                await conn.run(f"tail -c +1 {log} | head -c 65536")
            return 3 * len(ids)

        for name, fn in (
            ("ours", ours),
            ("per_job_squeue", per_job_squeue),
            ("per_job_3_commands", per_job_three_commands),
        ):
            times, commands, job_rpcs = [], 0, []
            for _ in range(repeat):
                before = await rpcs(conn)
                start = time.perf_counter()
                commands = await fn()
                times.append(time.perf_counter() - start)
                job_rpcs.append(await rpcs(conn) - before)
            result[name] = {
                "seconds": statistics.median(times),
                "commands": commands,
                "slurmctld_job_rpcs": statistics.median(job_rpcs),
            }
        await hook.close()
    finally:
        for start in range(0, len(ids), 500):
            await conn.run(shlex.join(["scancel", *ids[start : start + 500]]))
        conn.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 10, 100, 500])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    connection_env()
    rows = [asyncio.run(measure(n, args.repeat)) for n in args.jobs]
    print(f"{'jobs':>5}  {'ours':>22}  {'per-job squeue':>22}  {'per-job 3 commands':>22}  ratio(per-job/ours)")
    for r in rows:
        cells = [
            f"{r[k]['commands']:>4} cmd {r[k]['slurmctld_job_rpcs']:>4} rpc {r[k]['seconds']:6.3f}s"
            for k in ("ours", "per_job_squeue", "per_job_3_commands")
        ]
        ratio = r["per_job_squeue"]["seconds"] / r["ours"]["seconds"]
        print(f"{r['jobs']:>5}  {'  '.join(cells)}  {ratio:6.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
