"""What the hooks do, written once for the sync hook and its async twin.

Each operation is a generator that yields `Command`s and receives their `Result`s; it returns
its answer. `run_sync` and `run_async` drive the same generator through a shell, so parsing and
decisions never depend on how the bytes travel (paramiko, asyncssh, or a local subprocess).
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from airflow_oellm.megatron import checkpoints
from airflow_oellm.megatron.checkpoints import TRACKER_FILE, CheckpointState
from airflow_oellm.slurm import commands
from airflow_oellm.slurm.commands import FileChunk, SlurmCommandError
from airflow_oellm.slurm.identity import JobIdentity, parse_comment
from airflow_oellm.slurm.offline_runs import OfflineRunSync, parse_sync, sync_script
from airflow_oellm.slurm.probe import PlatformProbe, probe_command
from airflow_oellm.slurm.shell import ENV_NAME, SECRETS_FROM_STDIN
from airflow_oellm.slurm.states import JobStatus

T = TypeVar("T")
SQUEUE_CHUNK = 1000


@dataclass(frozen=True)
class Command:
    script: str
    stdin: bytes | None = None
    timeout: float = 120.0
    label: str = ""

    def __repr__(self) -> str:  # stdin may carry secrets: never print it
        return f"Command(label={self.label!r}, script={self.script[:80]!r}...)"


@dataclass(frozen=True)
class Result:
    rc: int  # -1: killed by a signal or no exit status
    stdout: str
    stderr: str


Operation = Generator[Command, Result, T]


def run_sync(op: Operation[T], execute: Callable[[Command], Result]) -> T:
    try:
        command = next(op)
        while True:
            command = op.send(execute(command))
    except StopIteration as done:
        return done.value


async def run_async(op: Operation[T], execute: Callable[[Command], Awaitable[Result]]) -> T:
    try:
        command = next(op)
        while True:
            command = op.send(await execute(command))
    except StopIteration as done:
        return done.value


def _checked(result: Result, what: str) -> Result:
    if result.rc != 0:
        raise commands.command_error(what, result.rc, result.stderr or result.stdout)
    return result


# ---------------------------------------------------------------- status


class FileWrite(NamedTuple):
    """A small file to replace atomically. With `replaces` (the sha256 of the content the writer last saw
    there, of b"" for no file) it lands only if the file still holds that content: a watch that stalled
    while another took its job over cannot overwrite the newer state (`writes_stale`)."""

    path: str
    data: bytes
    replaces: str | None = None


@dataclass(frozen=True)
class CycleRequest:
    """What one poll cycle should learn (and write) besides job states, all in one command."""

    reads: Sequence[tuple[str, int, int]] = ()  # (path, offset, max bytes)
    stats: Sequence[str] = ()  # paths whose modification time is wanted
    checkpoints: Sequence[str] = ()  # checkpoint directories to probe
    writes: Sequence[FileWrite | tuple[str, bytes]] = ()  # small files to replace atomically (state files)


@dataclass(frozen=True)
class CycleResult:
    statuses: dict[str, JobStatus]
    chunks: list[FileChunk]
    mtimes: list[float | None]
    checkpoints: list[CheckpointState]
    writes_ok: list[bool]
    writes_stale: list[bool] = field(default_factory=list)  # refused: the file no longer held `replaces`
    # the expected starts asked for (`start_of`): None when not asked or squeue --start failed
    start_estimates: dict[str, float | None] | None = None


@dataclass(frozen=True)
class PollUpdate:
    """One cycle's answer for one watcher: its job's status and its file requests' results,
    or the error that made the cycle fail (status None, nothing read)."""

    job_id: str | None
    status: JobStatus | None
    cycle: int
    error: str | None = None
    consecutive_failures: int = 0
    permanent: bool = False
    chunks: tuple[FileChunk, ...] = ()
    mtimes: dict[str, float | None] = field(default_factory=dict)
    checkpoints: tuple[CheckpointState, ...] = ()
    writes_ok: tuple[bool, ...] = ()
    failing_since: float | None = None  # epoch seconds of the first failed cycle in a row (an error's)
    superseded: bool = False  # a guarded write was refused: another watcher saved that file since

    @classmethod
    def from_cycle(cls, job_id: str | None, request: CycleRequest, result: CycleResult, cycle: int) -> PollUpdate:
        """A watcher's update from a cycle that served its request alone (the sync hooks' polls)."""
        return cls(
            job_id,
            result.statuses.get(job_id) if job_id is not None else None,
            cycle,
            chunks=tuple(result.chunks),
            mtimes=dict(zip(request.stats, result.mtimes, strict=True)),
            checkpoints=tuple(result.checkpoints),
            writes_ok=tuple(result.writes_ok),
            superseded=any(result.writes_stale),
        )

    @classmethod
    def failed(
        cls, job_id: str | None, error: SlurmCommandError, cycle: int, failures: int, since: float | None = None
    ) -> PollUpdate:
        return cls(job_id, None, cycle, str(error), failures, not error.transient, failing_since=since)


def poll_cycle(
    job_ids: Sequence[str],
    request: CycleRequest = CycleRequest(),
    chunk_size: int = SQUEUE_CHUNK,
    start_of: Sequence[str] = (),
) -> Operation[CycleResult]:
    """One command for the states of all jobs (squeue per chunk of ids), the expected starts of `start_of`
    (pending jobs: `squeue --start`) and every file request; then one sacct for the jobs that left the queue
    or just ended (it has exit codes, `CANCELLED by <uid>` and the requeue history; squeue does not)."""
    ids = list(dict.fromkeys(str(j) for j in job_ids))
    chunks_of_ids = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    parts = ["umask 077"]
    parts += [commands.squeue_section(chunk) for chunk in chunks_of_ids]
    if start_of:
        parts.append(commands.start_estimates_section(list(dict.fromkeys(str(j) for j in start_of))))
    if request.reads:
        parts.append(commands.read_ranges_script(request.reads))
    parts += [commands.stat_script(i, path) for i, path in enumerate(request.stats)]
    parts += [checkpoints.probe_script(i, path) for i, path in enumerate(request.checkpoints)]
    parts += [commands.write_script(i, *FileWrite(*write)) for i, write in enumerate(request.writes)]
    result = yield Command("; ".join(parts), label="poll")
    if result.rc != 0:
        raise commands.command_error("poll", result.rc, result.stderr or result.stdout)

    found: dict[str, JobStatus] = {}
    sections = commands.parse_squeue_sections(result.stdout)
    if len(sections) != len(chunks_of_ids):
        raise SlurmCommandError("poll output incomplete (connection dropped?)", transient=True)
    for chunk, (rc, text) in zip(chunks_of_ids, sections, strict=True):
        if rc != 0 and not commands.squeue_not_found(rc, text):
            raise commands.command_error("squeue", rc, text)
        found.update(commands.match_requested(chunk, commands.parse_squeue(text)))
    ask = [j for j in ids if j not in found or found[j].is_terminal]
    if ask:
        answer = yield Command(shlex.join(commands.sacct_argv(ask)), label="sacct")
        if answer.rc != 0 and not commands.accounting_disabled(answer.stderr):
            raise commands.command_error("sacct", answer.rc, answer.stderr)
        for job_id, status in commands.match_requested(ask, commands.parse_sacct(answer.stdout)).items():
            # sacct lags squeue by up to a second or two: keep squeue's final state until sacct has one
            if job_id not in found or status.is_terminal:
                found[job_id] = status

    lines = result.stdout.splitlines()
    mtimes: list[float | None] = [None] * len(request.stats)
    probes: list[CheckpointState | None] = [None] * len(request.checkpoints)
    writes_ok = [False] * len(request.writes)
    writes_stale = [False] * len(request.writes)
    for line in lines:
        kind, _, rest = line.partition(" ")
        index_text, _, value = rest.partition(" ")
        if not index_text.isdigit():
            continue
        index = int(index_text)
        if kind == "S" and index < len(mtimes):
            mtimes[index] = float(value) if re.match(r"^\d+$", value.strip()) else None
        elif kind == "W" and index < len(writes_ok):
            writes_ok[index] = value.strip() == "ok"
            writes_stale[index] = value.strip() == "stale"
        elif kind == "C" and index < len(probes):
            parsed = checkpoints.parse_probe(line)
            if parsed:
                probes[parsed[0]] = parsed[1]
    if any(p is None for p in probes):
        raise SlurmCommandError("checkpoint probe output incomplete", transient=True)
    chunks = commands.parse_read_ranges(result.stdout, request.reads) if request.reads else []
    return CycleResult(
        {j: found.get(j) or JobStatus.not_found(j) for j in ids},
        chunks,
        mtimes,
        [p for p in probes if p is not None],
        writes_ok,
        writes_stale,
        commands.parse_start_estimates(result.stdout) if start_of else None,
    )


def job_statuses(job_ids: Sequence[str], chunk_size: int = SQUEUE_CHUNK) -> Operation[dict[str, JobStatus]]:
    """Status of many jobs: one command (squeue per chunk of ids), then one sacct for those that ended."""
    cycle = yield from poll_cycle(job_ids, chunk_size=chunk_size)
    return cycle.statuses


def find_jobs(*, comment_prefix: str | None = None, names: Sequence[str] = ()) -> Operation[list[JobStatus]]:
    """Jobs of the SSH user whose comment starts with a prefix (in the queue) or whose name matches
    (in the queue and in accounting, which also knows finished jobs)."""
    result = yield Command(shlex.join(commands.squeue_user_active_argv()), label="squeue")
    _checked(result, "squeue")
    queued = commands.parse_squeue(result.stdout)
    matches = [
        s for s in queued if (comment_prefix and (s.comment or "").startswith(comment_prefix)) or (s.name in names)
    ]
    if names:
        result = yield Command(shlex.join(commands.sacct_by_name_argv(list(names))), label="sacct")
        if result.rc != 0 and not commands.accounting_disabled(result.stderr):
            raise commands.command_error("sacct", result.rc, result.stderr)
        seen = {s.job_id for s in matches}
        matches += [s for s in commands.parse_sacct(result.stdout) if s.job_id not in seen and s.name in names]
    return matches


# ---------------------------------------------------------------- submission


def submit(script_path: str, options: Sequence[str] = ()) -> Operation[tuple[str, str | None]]:
    """Plain `sbatch --parsable` (no reconciliation): (job id, cluster)."""
    result = yield Command(shlex.join(commands.sbatch_argv(script_path, options)), label="sbatch")
    return commands.parse_sbatch(_checked(result, "sbatch").stdout)


@dataclass(frozen=True)
class SubmitOutcome:
    """`submitted`: a new job; `recorded`: this attempt was submitted before (its job id);
    `adopted`: an earlier attempt of the same task is still active and is followed instead;
    `ended`: the latest earlier attempt's job has ended and no try decided it (its follower died): its
    result is taken instead of submitting (`try_number` is that attempt's)."""

    kind: str
    job_id: str
    cluster: str | None = None
    comment: str | None = None
    try_number: int | None = None


class SubmissionConflict(RuntimeError):
    """Another task's job is active on the same output directory."""


def submit_once_script(
    identity: JobIdentity,
    script_path: str,
    options: Sequence[str],
    min_interval: float,
    lock_timeout: int,
    decided: Sequence[str] | None = None,
) -> str:
    """Reconcile and submit under a lock on the output directory, in one remote command.

    Order: this attempt's record -> any active job on the output dir -> the latest earlier attempt's
    record, whose job has then ended: unless its job is one of `decided` (None: the caller keeps no
    decisions, never take one), it is taken instead of a new one -> sbatch (at most one per
    `min_interval` seconds per cluster user) -> record. SIGHUP is ignored so a dropped connection
    cannot stop the script between sbatch and writing the record. Secrets arrive on stdin as
    `NAME=<base64>` lines and are exported for sbatch (the job inherits them), never written down.
    """
    q = shlex.quote
    state = q(identity.state_dir)
    record = q(identity.record_path)
    sbatch = shlex.join(commands.sbatch_argv(script_path, [f"--comment={identity.comment}", *options]))
    return f"""set -u
trap '' HUP
{SECRETS_FROM_STDIN}
(umask 077 && mkdir -p {state}/submissions) || {{ echo "OELLM-ERROR cannot create {state}"; exit 3; }}
exec 8>>{state}/submit.lock
flock -w {int(lock_timeout)} 8 || {{ echo "OELLM-ERROR timed out waiting for {state}/submit.lock"; exit 3; }}
if [ -s {record} ]; then echo "OELLM-RECORDED $(head -n 1 {record})"; exit 0; fi
queue=$(squeue --noheader --me --format='%A|%k' 2>&1) || {{ echo "OELLM-RETRY squeue: $queue"; exit 4; }}
found=0
while IFS='|' read -r jid comment; do
  case "$comment" in oellm/{identity.workspace_key}/*) echo "OELLM-ACTIVE $jid $comment"; found=1;; esac
done <<OELLM_QUEUE
$queue
OELLM_QUEUE
[ "$found" = 1 ] && exit 0
for try in $(seq {identity.try_number - 1 if decided is not None else 0} -1 1); do
  earlier={state}/submissions/{identity.task_key}-$try
  [ -s "$earlier" ] || continue
  jid=$(head -n 1 "$earlier"); jid=${{jid%%;*}}
  case " "{shlex.quote(" ".join(decided or ()))}" " in *" $jid "*) ;; *) echo "OELLM-ENDED $jid $try"; exit 0;; esac
  break
done
mkdir -p "$HOME/.oellm"
exec 9>>"$HOME/.oellm/sbatch.lock"
flock -w {int(lock_timeout)} 9 || {{ echo "OELLM-ERROR timed out waiting for $HOME/.oellm/sbatch.lock"; exit 3; }}
last=$(cat "$HOME/.oellm/sbatch.last" 2>/dev/null || echo 0)
pause=$(awk -v l="$last" -v n="$(date +%s.%N)" -v m={float(min_interval)} \
  'BEGIN {{ d = l + m - n; if (d > 0 && d <= m) printf "%.3f", d; else printf "0" }}')
[ "$pause" != 0 ] && sleep "$pause"
out=$({sbatch} 2>&1); rc=$?
date +%s.%N > "$HOME/.oellm/sbatch.last"
if [ $rc -ne 0 ]; then echo "OELLM-SBATCH-FAILED $rc"; printf '%s\\n' "$out"; exit 0; fi
id=$(printf '%s\\n' "$out" | tail -n 1)
(umask 077; printf '%s\\n' "$id" > {record}.tmp) && mv -f {record}.tmp {record}
echo "OELLM-SUBMITTED $id"
"""


def encode_secrets(secrets: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in secrets.items():
        if not ENV_NAME.match(name):
            raise ValueError(f"invalid secret variable name {name!r}")
        lines.append(f"{name}={base64.b64encode(str(value).encode()).decode()}")
    return ("\n".join(lines) + "\n").encode()


def submit_once(
    identity: JobIdentity,
    script_path: str,
    *,
    options: Sequence[str] = (),
    secrets: Mapping[str, str] | None = None,
    min_interval: float = 1.0,
    lock_timeout: int = 300,
    decided: Sequence[str] | None = None,
) -> Operation[SubmitOutcome]:
    """Submit unless this attempt (or another attempt of the same task that is still active) already was,
    or the latest earlier attempt's job ended with no try deciding it (not one of `decided`)."""
    if decided is not None:
        decided = [commands.checked_job_id(j) for j in decided]  # they reach the script: digits only
    script = submit_once_script(identity, script_path, options, min_interval, lock_timeout, decided)
    result = yield Command(script, stdin=encode_secrets(secrets or {}), timeout=2 * lock_timeout + 120, label="sbatch")
    lines = result.stdout.splitlines()
    tags = [line for line in lines if line.startswith("OELLM-")]
    if result.rc != 0 or not tags:
        detail = (tags[0] if tags else (result.stderr or result.stdout).strip()) or f"exit status {result.rc}"
        raise SlurmCommandError(
            f"submission failed: {detail}", transient=result.rc in (-1, 4) or commands.is_transient(detail)
        )
    tag, _, rest = tags[0].partition(" ")
    if tag in ("OELLM-SUBMITTED", "OELLM-RECORDED"):
        job_id, cluster = commands.parse_sbatch(rest)
        return SubmitOutcome("submitted" if tag == "OELLM-SUBMITTED" else "recorded", job_id, cluster)
    if tag == "OELLM-ENDED":
        job_id, _, try_number = rest.partition(" ")
        return SubmitOutcome("ended", job_id, try_number=int(try_number))
    if tag == "OELLM-ACTIVE":
        active = [line.split(" ", 2)[1:] for line in tags if line.startswith("OELLM-ACTIVE ")]
        for job_id, comment in active:
            parsed = parse_comment(comment)
            if parsed and parsed.task_key == identity.task_key:
                return SubmitOutcome("adopted", job_id, comment=comment)
        jobs = ", ".join(f"{j} ({c})" for j, c in active)
        raise SubmissionConflict(
            f"output directory {identity.output_dir} is in use by job(s) {jobs} "
            "of another run or task; not submitting a second job there"
        )
    if tag == "OELLM-SBATCH-FAILED":
        message = "\n".join(lines[lines.index(tags[0]) + 1 :]).strip()
        raise SlurmCommandError(f"sbatch failed: {message}", transient=commands.is_transient(message))
    raise SlurmCommandError(f"submission failed: {tags[0]}", transient=tag == "OELLM-RETRY")


def cancel(job_ids: Sequence[str], signal: str | None = None, *, batch_only: bool = False) -> Operation[None]:
    result = yield Command(shlex.join(commands.scancel_argv(job_ids, signal, batch_only=batch_only)), label="scancel")
    _checked(result, "scancel")


def kill(job_ids: Sequence[str]) -> Operation[None]:
    """SIGKILL to the jobs' processes, no SIGTERM first (commands.kill_script)."""
    result = yield Command(commands.kill_script(job_ids), label="kill")
    _checked(result, "kill")


def exclude_nodes(job_id: str, nodes: Sequence[str]) -> Operation[None]:
    result = yield Command(shlex.join(commands.exclude_nodes_argv(job_id, nodes)), label="scontrol")
    _checked(result, "scontrol update")


# ---------------------------------------------------------------- files


def upload(path: str, content: bytes | str, mode: str = "0600") -> Operation[None]:
    data = content.encode() if isinstance(content, str) else content
    result = yield Command(commands.upload_script(path, mode), stdin=data, label="upload")
    _checked(result, f"upload of {path}")


def mkdirs(paths: Sequence[str]) -> Operation[None]:
    result = yield Command(shlex.join(commands.mkdir_argv(paths)), label="mkdir")
    _checked(result, "mkdir")


def read_ranges(requests: Sequence[tuple[str, int, int]]) -> Operation[list[FileChunk]]:
    """Size and new bytes of many files in one round trip."""
    if not requests:
        return []
    result = yield Command(commands.read_ranges_script(requests), label="read")
    return commands.parse_read_ranges(_checked(result, "read").stdout, requests)


def write_files(files: Sequence[tuple[str, bytes]]) -> Operation[list[bool]]:
    """Replace small files atomically (their directories are made), in one round trip; which landed."""
    if not files:
        return []
    result = yield from poll_cycle([], CycleRequest(writes=files))
    return result.writes_ok


def read_range(path: str, offset: int, limit: int) -> Operation[FileChunk]:
    chunks = yield from read_ranges([(path, offset, limit)])
    return chunks[0]


def read_tracker(checkpoint_dir: str) -> Operation[int | str | None]:
    """Megatron's latest checkpointed iteration (`release` for a release checkpoint), None if absent."""
    chunk = yield from read_range(f"{checkpoint_dir.rstrip('/')}/{TRACKER_FILE}", 0, 64)
    return None if chunk.size is None else commands.parse_tracker(chunk.data)


def delete_checkpoints(
    checkpoint_dir: str, deletions: Sequence[tuple[int, Sequence[str]]]
) -> Operation[tuple[list[int], list[int]]]:
    """Retention: delete checkpoints, each unless the tracker names it or a branch has not consumed it
    (megatron/checkpoints.retention_script). Returns (deleted, kept)."""
    if not deletions:
        return [], []
    result = yield Command(checkpoints.retention_script(checkpoint_dir, deletions), label="retention")
    return checkpoints.parse_retention(_checked(result, f"retention in {checkpoint_dir}").stdout)


def rewind_checkpoints(checkpoint_dir: str, iteration: int, discard_dir: str) -> Operation[list[int]]:
    """Set `checkpoint_dir` back to checkpoint `iteration` (0: none); later ones move into `discard_dir`.
    Returns the iterations moved (megatron/checkpoints.rewind_script)."""
    result = yield Command(checkpoints.rewind_script(checkpoint_dir, iteration, discard_dir), label="rewind")
    return checkpoints.parse_rewind(_checked(result, f"rewind of {checkpoint_dir} to {iteration}").stdout)


def probe_platform(env_names: Sequence[str], paths: Sequence[str]) -> Operation[PlatformProbe]:
    """The login node's environment, host name and files, as platform detection needs them
    (config/platforms.py decides which, and what they mean)."""
    result = yield Command(probe_command(env_names, paths), label="probe")
    return PlatformProbe.parse(_checked(result, "platform probe").stdout)


def sync_offline_runs(
    offline_dir: str,
    run_id: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    workspace_key: str | None = None,
    timeout: float = 3600.0,
) -> Operation[OfflineRunSync]:
    """Push the finished offline W&B runs of `run_id` from the login node, each once (slurm/offline_runs.py);
    with `workspace_key`, the newest waits while a job on that output directory runs."""
    script = sync_script(offline_dir, run_id, command, env=env or {}, workspace_key=workspace_key)
    result = yield Command(script, stdin=encode_secrets(secrets or {}), timeout=timeout, label="wandb sync")
    if result.rc != 0:
        detail = (result.stderr or result.stdout).strip() or f"exit status {result.rc}"
        raise SlurmCommandError(f"wandb sync failed: {detail}", transient=result.rc in (-1, 4))
    return parse_sync(result.stdout)
