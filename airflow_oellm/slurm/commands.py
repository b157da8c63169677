"""SLURM and file commands as argv lists or quoted scripts, and parsers for what they print.

Pure: nothing here runs a command. `operations.py` sequences these; the hooks carry them to a
shell (SSH or local). Every value that reaches a command line is quoted with `shlex`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from airflow_oellm.slurm.states import JobState, JobStatus

SQUEUE_FORMAT = "%i|%A|%F|%K|%T|%r|%N|%j|%k"  # comment last: it may contain '|'
SACCT_FIELDS = "JobID,JobIDRaw,State,ExitCode,Reason,NodeList,Start,End,JobName,Comment"
# what SLURM prints when the controller or the database is busy or briefly away: retry, never final
_TRANSIENT = re.compile(
    r"Socket timed out|Unable to contact slurm controller|slurm_load_jobs error(?!: Invalid job id)"
    r"|Resource temporarily unavailable|fork: (retry|Resource)|Connection (refused|reset|timed out)"
    r"|Zero Bytes were transmitted|Transport endpoint|Communication connection failure"
    r"|slurmdbd|Problem talking to the database|Slurm backup controller in standby mode|try again",
    re.IGNORECASE,
)
_NOT_FOUND = re.compile(r"Invalid job id specified", re.IGNORECASE)
_ACCOUNTING_OFF = re.compile(r"accounting storage is disabled", re.IGNORECASE)


class SlurmCommandError(RuntimeError):
    """A command failed. `transient` ones (controller busy, connection dropped) should be retried."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


def is_transient(stderr: str) -> bool:
    return bool(_TRANSIENT.search(stderr))


def command_error(what: str, rc: int, stderr: str) -> SlurmCommandError:
    text = stderr.strip().splitlines()
    detail = text[-1] if text else f"exit status {rc}"
    return SlurmCommandError(f"{what} failed (exit {rc}): {detail}", transient=rc < 0 or is_transient(stderr))


# ---------------------------------------------------------------- squeue / sacct


def squeue_argv(job_ids: Sequence[str]) -> list[str]:
    """All states, so jobs that ended within MinJobAge still show their final state."""
    return ["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}", f"--format={SQUEUE_FORMAT}"]


def squeue_user_active_argv() -> list[str]:
    return ["squeue", "--noheader", "--me", f"--format={SQUEUE_FORMAT}"]


def sacct_argv(job_ids: Sequence[str]) -> list[str]:
    """Allocations only (-X), every requeue run (-D), parsable."""
    return ["sacct", "-X", "-D", "-n", "-P", f"--jobs={','.join(job_ids)}", f"--format={SACCT_FIELDS}"]


def sacct_by_name_argv(names: Sequence[str], since: str = "now-30days") -> list[str]:
    return [
        "sacct",
        "-X",
        "-D",
        "-n",
        "-P",
        f"--name={','.join(names)}",
        f"--starttime={since}",
        f"--format={SACCT_FIELDS}",
    ]


def squeue_not_found(rc: int, stderr: str) -> bool:
    """squeue exits 1 with 'Invalid job id specified' when none of the ids is known."""
    return rc != 0 and bool(_NOT_FOUND.search(stderr)) and not is_transient(stderr)


def accounting_disabled(stderr: str) -> bool:
    return bool(_ACCOUNTING_OFF.search(stderr))


def _none(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "(null)", "N/A", "None", "None assigned", "Unknown") else text


def _exit(text: str) -> tuple[int | None, int | None]:
    m = re.match(r"^(\d+):(\d+)$", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def parse_squeue(text: str) -> list[JobStatus]:
    statuses = []
    for line in text.splitlines():
        parts = line.split("|", 8)
        if len(parts) != 9:
            continue
        display, raw, array_job, array_task, state, reason, nodes, name, comment = parts
        array = _none(array_task) is not None
        statuses.append(
            JobStatus(
                job_id=raw.strip(),
                display_id=display.strip(),
                state=JobState.parse(state),
                raw_state=state.strip(),
                array_job_id=array_job.strip() if array else None,
                array_task_id=array_task.strip() if array else None,
                reason=_none(reason),
                nodes=_none(nodes),
                name=name,
                comment=_none(comment),
                source="squeue",
            )
        )
    return statuses


def parse_sacct(text: str) -> list[JobStatus]:
    """One status per job (its latest run); earlier runs of a requeued job become its history."""
    runs: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        parts = line.split("|", 9)
        if len(parts) != 10 or "." in parts[1]:  # steps (123.batch) are not jobs
            continue
        runs.setdefault(parts[1].strip(), []).append(parts)
    statuses = []
    for raw_id, records in runs.items():
        display, _, state, exit_code, reason, nodes, start, end, name, comment = records[-1]
        code, signal = _exit(exit_code)
        m = re.match(r"^CANCELLED by (\S+)", state.strip())
        array = re.match(r"^(\d+)_(\d+|\[.*\])$", display.strip())
        history = tuple(r[2].strip() for r in records[:-1])
        statuses.append(
            JobStatus(
                job_id=raw_id,
                display_id=display.strip(),
                state=JobState.parse(state),
                raw_state=state.strip(),
                array_job_id=array.group(1) if array else None,
                array_task_id=array.group(2) if array else None,
                reason=_none(reason),
                exit_code=code,
                exit_signal=signal,
                cancelled_by=m.group(1) if m else None,
                nodes=_none(nodes),
                name=name,
                comment=_none(comment),
                start=_none(start),
                end=_none(end),
                restarts=sum(
                    1
                    for s in history
                    if JobState.parse(s) in (JobState.REQUEUED, JobState.PREEMPTED, JobState.NODE_FAIL)
                ),
                source="sacct",
                history=history,
            )
        )
    return statuses


def aggregate_array(job_id: str, elements: Sequence[JobStatus]) -> JobStatus:
    """One status for a whole job array: active while any element is, else the first failure."""
    if not elements:
        return JobStatus.not_found(job_id)
    active = [e for e in elements if e.state.is_active]
    if active:
        running = [e for e in active if e.state is JobState.RUNNING]
        pick = (running or active)[0]
    else:
        failed = [e for e in elements if not e.state.is_success]
        pick = failed[0] if failed else elements[0]
    return JobStatus(
        job_id=job_id,
        display_id=job_id,
        state=pick.state,
        raw_state=pick.raw_state,
        array_job_id=job_id,
        reason=pick.reason,
        exit_code=pick.exit_code,
        exit_signal=pick.exit_signal,
        cancelled_by=pick.cancelled_by,
        nodes=pick.nodes,
        name=pick.name,
        comment=pick.comment,
        source=pick.source,
    )


def match_requested(requested: Sequence[str], statuses: Iterable[JobStatus]) -> dict[str, JobStatus]:
    """Statuses for the requested ids: a raw id, an `A_T` element id, or an array job id."""
    statuses = list(statuses)
    by_raw: dict[str, JobStatus] = {}
    by_display: dict[str, JobStatus] = {}
    by_array: dict[str, list[JobStatus]] = {}
    for s in statuses:
        if s.array_job_id is not None:
            by_array.setdefault(s.array_job_id, []).append(s)
            by_display[s.display_id] = s
        else:
            by_raw[s.job_id] = s
    found: dict[str, JobStatus] = {}
    for job_id in requested:
        if job_id in by_raw:
            found[job_id] = by_raw[job_id]
        elif job_id in by_display:
            found[job_id] = by_display[job_id]
        elif job_id in by_array:
            found[job_id] = aggregate_array(job_id, by_array[job_id])
    return found


# ---------------------------------------------------------------- sbatch / scancel / scontrol


def sbatch_argv(script_path: str, options: Sequence[str] = ()) -> list[str]:
    return ["sbatch", "--parsable", *options, script_path]


def parse_sbatch(stdout: str) -> tuple[str, str | None]:
    """`123` or `123;cluster` -> ("123", "cluster")."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise SlurmCommandError("sbatch printed no job id", transient=False)
    job, _, cluster = lines[-1].partition(";")
    if not re.match(r"^\d+$", job):
        raise SlurmCommandError(f"sbatch printed {lines[-1]!r}, not a job id", transient=False)
    return job, cluster or None


def scancel_argv(job_ids: Sequence[str], signal: str | None = None, *, batch_only: bool = False) -> list[str]:
    argv = ["scancel"]
    if signal:
        if not re.match(r"^[A-Z0-9]+$", signal):
            raise ValueError(f"invalid signal name {signal!r}")
        argv.append(f"--signal={signal}")
    if batch_only:
        argv.append("--batch")
    return [*argv, *(checked_job_id(j) for j in job_ids)]


def kill_script(job_ids: Sequence[str]) -> str:
    """SIGKILL to every step of the jobs, then to their batch shells and the shells' children, so that no process
    of theirs gets a SIGTERM first. `scancel --signal=KILL JOB` cancels the job as a whole, and a cancelled job's
    processes get SIGTERM before SIGKILL (seen on SLURM 22.05): Megatron's exit handler would save on it.
    `--batch` alone reaches the shell, not its children (a trainer started without srun lives on, orphaned,
    under proctrack/linuxproc): `--full` reaches them too. Jobs that already ended are no error: their end is
    what the caller waits for."""
    parts = []
    for job in (checked_job_id(j) for j in job_ids):
        parts.append(
            f"for s in $(squeue -h -s -j {job} -o %i 2>/dev/null); do case $s in *.batch|*.extern) ;; "
            f'*) scancel --signal=KILL "$s" 2>/dev/null;; esac; done; '
            f"scancel --batch --full --signal=KILL {job} 2>/dev/null"
        )
    return "; ".join([*parts, "true"])


def exclude_nodes_argv(job_id: str, nodes: Sequence[str]) -> list[str]:
    for node in nodes:
        if not re.match(r"^[A-Za-z0-9_.\-\[\],]+$", node):
            raise ValueError(f"invalid node name {node!r}")
    return ["scontrol", "update", f"JobId={checked_job_id(job_id)}", f"ExcNodeList={','.join(nodes)}"]


def checked_job_id(job_id: str) -> str:
    if not re.match(r"^\d+(_\d+)?$", str(job_id)):
        raise ValueError(f"invalid job id {job_id!r}")
    return str(job_id)


# ---------------------------------------------------------------- files


def upload_script(path: str, mode: str = "0600") -> str:
    """Write stdin to `path` atomically: a temp file in the same directory, chmod, then rename."""
    if not re.match(r"^0?[0-7]{3}$", mode):
        raise ValueError(f"invalid file mode {mode!r}")
    p = shlex.quote(path)
    directory = shlex.quote(path.rsplit("/", 1)[0] or "/")
    return (
        f"set -e; umask 077; mkdir -p -- {directory}; "
        f"tmp=$(mktemp {directory}/.oellm-upload.XXXXXX); trap 'rm -f \"$tmp\"' EXIT; "
        f'cat > "$tmp"; chmod {mode} "$tmp"; mv -f -- "$tmp" {p}; trap - EXIT'
    )


def mkdir_argv(paths: Sequence[str]) -> list[str]:
    return ["mkdir", "-p", "--", *paths]


@dataclass(frozen=True)
class FileChunk:
    """Bytes read from `offset`; `size` is the whole file's size, None when it does not exist."""

    path: str
    offset: int
    size: int | None
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def read_ranges_script(requests: Sequence[tuple[str, int, int]]) -> str:
    """One round trip for many files: size and up to `limit` bytes from `offset`, base64 framed.

    Prints one line per file: `F <index> <size or -1> <base64>`. A file that shrank below the
    offset (truncated log) reports its size and no data; the caller decides.
    """
    parts = [
        'r() { if [ -f "$2" ]; then s=$(stat -c %s -- "$2" 2>/dev/null || echo -1); '
        'if [ "$s" -gt "$3" ] 2>/dev/null; then d=$(tail -c +$(( $3 + 1 )) -- "$2" | head -c "$4" | '
        'base64 -w0); else d=; fi; else s=-1; d=; fi; printf \'F %s %s %s\\n\' "$1" "$s" "$d"; }'
    ]
    for i, (path, offset, limit) in enumerate(requests):
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        parts.append(f"r {i} {shlex.quote(path)} {int(offset)} {int(limit)}")
    return "; ".join(parts)


def parse_read_ranges(stdout: str, requests: Sequence[tuple[str, int, int]]) -> list[FileChunk]:
    chunks: dict[int, FileChunk] = {}
    for line in stdout.splitlines():
        fields = line.split(" ")
        if len(fields) < 3 or fields[0] != "F" or not fields[1].isdigit():
            continue
        index = int(fields[1])
        if index >= len(requests):
            continue
        path, offset, _ = requests[index]
        size = int(fields[2]) if re.match(r"^-?\d+$", fields[2]) else -1
        data = base64.b64decode(fields[3]) if len(fields) > 3 and fields[3] else b""
        chunks[index] = FileChunk(path, offset, None if size < 0 else size, data)
    missing = [requests[i][0] for i in range(len(requests)) if i not in chunks]
    if missing:
        raise SlurmCommandError(f"no answer for {len(missing)} file(s), e.g. {missing[0]}", transient=True)
    return [chunks[i] for i in range(len(requests))]


def stat_script(index: int, path: str) -> str:
    """Prints `S <index> <mtime seconds or -1>`."""
    return f'printf "S {int(index)} %s\\n" "$(stat -c %Y -- {shlex.quote(path)} 2>/dev/null || echo -1)"'


def write_script(index: int, path: str, data: bytes, replaces: str | None = None) -> str:
    """Atomically replace a small file (state files); prints `W <index> ok|fail|stale`.

    With `replaces` (a sha256 hex digest) the file is replaced only if its content still hashes to it
    (no file hashes as empty), or already is `data` (a write that landed while its answer was lost, retried),
    else `stale`: compare and swap, under a lock next to the file."""
    p = shlex.quote(path)
    directory = shlex.quote(path.rsplit("/", 1)[0] or "/")
    payload = base64.b64encode(data).decode()
    i = int(index)
    replace = f"printf %s {payload} | base64 -d > {p}.oellm-tmp && mv -f -- {p}.oellm-tmp {p} && echo 'W {i} ok'"
    if replaces is None:
        return f"{{ mkdir -p -- {directory} && {replace}; }} || echo 'W {i} fail'"
    current = f"c=$(cat -- {p} 2>/dev/null | sha256sum | cut -c1-64)"
    unchanged = f'[ "$c" = {shlex.quote(replaces)} ] || [ "$c" = {hashlib.sha256(data).hexdigest()} ]'
    guarded = f"flock -w 30 9 || exit 1; {current}; if {unchanged}; then {replace}; else echo 'W {i} stale'; fi"
    return f"{{ mkdir -p -- {directory} && ( {guarded} ) 9>>{p}.oellm-lock; }} || echo 'W {i} fail'"


def squeue_section(job_ids: Sequence[str]) -> str:
    """squeue inside a combined script: `@@squeue <rc>`, its output and errors, `@@end`."""
    return (
        f"q=$({shlex.join(squeue_argv(job_ids))} 2>&1); printf '@@squeue %s\\n' \"$?\"; "
        "printf '%s\\n' \"$q\"; echo @@end"
    )


def start_estimates_section(job_ids: Sequence[str]) -> str:
    """`squeue --start` for pending jobs inside a combined script, times as epoch seconds (no time zone to
    guess): `@@start <rc>`, its output and errors, `@@end`."""
    argv = ["squeue", "--noheader", "--start", f"--jobs={','.join(job_ids)}", "--format=%A|%S"]
    return (
        f"s=$(SLURM_TIME_FORMAT=%s {shlex.join(argv)} 2>&1); printf '@@start %s\\n' \"$?\"; "
        "printf '%s\\n' \"$s\"; echo @@end"
    )


def parse_start_estimates(stdout: str) -> dict[str, float | None] | None:
    """Each listed job's expected start (None: SLURM has none yet) from a combined script's output; None when
    the section is missing or squeue failed (the estimate is left as it was: it never fails a poll)."""
    m = re.search(r"^@@start (-?\d+)\n(.*?)^@@end$", stdout, re.M | re.S)
    if m is None or int(m.group(1)) != 0:
        return None
    estimates: dict[str, float | None] = {}
    for line in m.group(2).splitlines():
        job_id, _, start = line.strip().partition("|")
        if job_id.isdigit():
            estimates[job_id] = float(start) if start.strip().isdigit() else None
    return estimates


def parse_squeue_sections(stdout: str) -> list[tuple[int, str]]:
    """(rc, text) of each squeue section of a combined script's output."""
    sections = []
    for m in re.finditer(r"^@@squeue (-?\d+)\n(.*?)^@@end$", stdout, re.M | re.S):
        sections.append((int(m.group(1)), m.group(2)))
    return sections


def parse_tracker(data: bytes) -> int | str | None:
    """Megatron's `latest_checkpointed_iteration.txt`: an iteration, `release`, or None if unreadable."""
    text = data.decode("utf-8", "replace").strip()
    if text == "release":
        return "release"
    return int(text) if re.match(r"^\d+$", text) else None
