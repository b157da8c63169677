"""Pushing a job's offline W&B runs from the login node: the remote script and what it reports.

wandb writes one `offline-run-<YYYYmmdd_HHMMSS>-<run id>` directory per attempt of a training. Each is
pushed once, after the job that wrote it ended, by `wandb sync <dir>`, which leaves `<run file>.synced`
beside it; a later sync skips it. A directory still being written is left for a later sync: its file is
written in blocks (a sync mid-run sees little or nothing), and pushing it again later would send its
whole history a second time (wandb/wandb#2887, #9525).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from airflow_oellm.slurm.identity import COMMENT_PREFIX
from airflow_oellm.slurm.shell import SECRETS_FROM_STDIN, check_env_name

TAG = "OELLM-WANDB-"
HEADER_BYTES = 7  # a `.wandb` file holding no record yet is its header alone
SAID_LINES = 5  # of wandb's output, kept for a directory it failed to push
# two syncs of one run at once (the branches of two checkpoints end together) would both push what neither
# had marked yet: they take turns
LOCK_FILE = ".oellm-sync.lock"
LOCK_WAIT = 3000  # seconds, within the command's own timeout


@dataclass(frozen=True)
class OfflineRunSync:
    """What one sync did, directory by directory."""

    synced: list[str] = field(default_factory=list)  # pushed now
    already: list[str] = field(default_factory=list)  # pushed by an earlier sync
    busy: list[str] = field(default_factory=list)  # still written by a running job: for a later sync
    empty: list[str] = field(default_factory=list)  # an attempt that ended before wandb wrote a record
    failed: list[tuple[str, str]] = field(default_factory=list)  # (directory, wandb's last lines)

    def summary(self) -> str:
        parts = [
            f"{len(v)} {k}"
            for k, v in (
                ("pushed", self.synced),
                ("pushed before", self.already),
                ("still written", self.busy),
                ("empty", self.empty),
                ("failed", self.failed),
            )
            if v
        ]
        return ", ".join(parts) or "no offline run yet"


def sync_script(
    offline_dir: str,
    run_id: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    workspace_key: str | None,
) -> str:
    """Push the offline runs of `run_id` under `offline_dir`, oldest first, each once, one sync of a run at a
    time. With `workspace_key`, a job of the SSH user still active on that output directory (its comment) is
    writing the newest, which waits. Secrets arrive on stdin as `NAME=<base64>` lines, as for sbatch."""
    q = shlex.quote
    exports = "".join(f"export {check_env_name(k)}={q(v)}\n" for k, v in env.items())
    sync = shlex.join(command)
    busy_check = ""
    if workspace_key is not None:
        prefix = f"{COMMENT_PREFIX}/{workspace_key}/"
        busy_check = f"""queue=$(squeue -h --me --format='%A|%k' 2>&1) || {{ echo "squeue: $queue" >&2; exit 4; }}
while IFS='|' read -r jid comment; do
  case "$comment" in {q(prefix)}*) busy=1;; esac
done <<OELLM_QUEUE
$queue
OELLM_QUEUE
"""
    return f"""set -u
export LC_ALL=C
{SECRETS_FROM_STDIN}
{exports}runs=()
for run in {q(offline_dir.rstrip("/"))}/offline-run-*-{q(run_id)}; do [ -d "$run" ] && runs+=("$run"); done
[ ${{#runs[@]}} -eq 0 ] && exit 0
exec 9>>{q(offline_dir.rstrip("/") + "/" + LOCK_FILE)}
flock -w {int(LOCK_WAIT)} 9 || {{ echo "timed out waiting for another sync of {q(run_id)}" >&2; exit 4; }}
busy=0
{busy_check}newest=${{runs[${{#runs[@]}}-1]}}
for run in "${{runs[@]}}"; do
  file="$run"/run-{q(run_id)}.wandb
  if [ "$busy" = 1 ] && [ "$run" = "$newest" ]; then echo "{TAG}BUSY $run"; continue; fi
  if [ -e "$file.synced" ]; then echo "{TAG}ALREADY $run"; continue; fi
  if [ "$(stat -c %s "$file" 2>/dev/null || echo 0)" -le {HEADER_BYTES} ]; then echo "{TAG}EMPTY $run"; continue; fi
  out=$({sync} "$run" 2>&1); rc=$?
  if [ -e "$file.synced" ]; then echo "{TAG}SYNCED $run"; continue; fi
  echo "{TAG}FAILED $rc $run"
  printf '%s\\n' "$out" | tail -n {SAID_LINES} | sed 's/^/{TAG}SAID /'
done
"""


def parse_sync(stdout: str) -> OfflineRunSync:
    """The script's report; a line that is not one of its tags (the shell's noise) is ignored."""
    result = OfflineRunSync()
    lists = {"SYNCED": result.synced, "ALREADY": result.already, "BUSY": result.busy, "EMPTY": result.empty}
    failures: list[tuple[str, str, list[str]]] = []
    for line in stdout.splitlines():
        if not line.startswith(TAG):
            continue
        kind, _, rest = line.removeprefix(TAG).partition(" ")
        if kind == "SAID" and failures:
            failures[-1][2].append(rest)
        elif kind == "FAILED":
            rc, _, directory = rest.partition(" ")
            failures.append((directory, rc, []))
        elif kind in lists:
            lists[kind].append(rest)
    result.failed.extend((d, f"wandb sync exit status {rc}: " + " / ".join(said)) for d, rc, said in failures)
    return result
