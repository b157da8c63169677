"""Megatron checkpoint readiness: when is checkpoint N complete?

`<save>/latest_checkpointed_iteration.txt` is written by rank 0 only after every rank finished a
save; inside `iter_NNNNNNN/`, `metadata.json` (torch_dist, zarr), `mp_rank_*/model_optim_rng.pt`
(legacy torch) or `.metadata` (torch_dcp and fsdp_dtensor: plain torch.distributed.checkpoint)
must exist. A directory that merely exists is being written. Checkpoint N is ready when the tracker
is at least N and `iter_N` is complete (so a torch_dist one caught before its metadata.json, with
the tracker still behind, is not taken for torch_dcp).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

TRACKER_FILE = "latest_checkpointed_iteration.txt"
COMPLETED = '"state": "completed"'  # a task's status file (monitor/records.TrainingStatus) once it succeeded


def iteration_dir(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def probe_script(index: int, checkpoint_dir: str) -> str:
    """Prints `C <index> <tracker or -> [<iteration>:<format> ...]` for the complete iteration dirs."""
    d = shlex.quote(checkpoint_dir.rstrip("/"))
    return (
        f"t=$(head -c 64 {d}/{TRACKER_FILE} 2>/dev/null | tr -dc 'a-z0-9'); o=; "
        f'for i in {d}/iter_*; do [ -d "$i" ] || continue; n=${{i##*/iter_}}; '
        'if [ -f "$i/metadata.json" ]; then o="$o $n:torch_dist"; '
        'elif ls "$i"/mp_rank_*/model_optim_rng.pt >/dev/null 2>&1; then o="$o $n:torch"; '
        'elif [ -f "$i/.metadata" ]; then o="$o $n:torch_dcp"; fi; done; '
        f'printf \'C %s %s%s\\n\' {int(index)} "${{t:--}}" "$o"'
    )


@dataclass(frozen=True)
class CheckpointState:
    tracker: int | str | None  # iteration, "release", or None (no tracker yet)
    complete: dict[int, str] = field(default_factory=dict)  # iteration -> format

    @property
    def latest(self) -> int | None:
        return self.tracker if isinstance(self.tracker, int) else None


def parse_probe(line: str) -> tuple[int, CheckpointState] | None:
    parts = line.split()
    if len(parts) < 3 or parts[0] != "C" or not parts[1].isdigit():
        return None
    tracker_text = parts[2]
    tracker: int | str | None = (
        int(tracker_text) if tracker_text.isdigit() else ("release" if tracker_text == "release" else None)
    )
    complete = {}
    for item in parts[3:]:
        m = re.match(r"^(\d+):(torch_dist|torch_dcp|torch)$", item)
        if m:
            complete[int(m.group(1))] = m.group(2)
    return int(parts[1]), CheckpointState(tracker, complete)


@dataclass(frozen=True)
class ReadyCheckpoint:
    iteration: int
    path: str
    format: str

    def to_dict(self) -> dict[str, object]:
        return {"iteration": self.iteration, "path": self.path, "format": self.format}


def ready(
    state: CheckpointState, checkpoint_dir: str, target: int, *, at_least: bool = False
) -> ReadyCheckpoint | None:
    """Checkpoint `target` (or, with `at_least`, the first complete one >= target) if it is complete."""
    latest = state.latest
    if latest is None or latest < target:
        return None
    candidates = sorted(i for i in state.complete if (i >= target if at_least else i == target) and i <= latest)
    if not candidates:
        return None
    iteration = candidates[0]
    return ReadyCheckpoint(
        iteration, f"{checkpoint_dir.rstrip('/')}/{iteration_dir(iteration)}", state.complete[iteration]
    )


def never(state: CheckpointState, target: int, *, at_least: bool = False) -> str | None:
    """Why checkpoint `target` will not appear any more, or None while it still can."""
    latest = state.latest
    if at_least or latest is None or latest <= target or target in state.complete:
        return None
    return (
        f"checkpoint {target} does not exist although training saved iteration {latest} "
        f"(save_interval does not divide {target}, or retention removed it)"
    )


def rewind_script(checkpoint_dir: str, iteration: int, discard_dir: str) -> str:
    """Set the save directory back to checkpoint `iteration` (0: to no checkpoint at all).

    The tracker file goes first, so that an interrupted rewind already resumes from `iteration`; then
    every `iter_N` with N above it moves into `discard_dir` (never deleted). Run again, it finishes what
    an interrupted run left. Prints `R <moved iterations ...>`; exits 3 when `iter_<iteration>` is missing.
    """
    d, dest = shlex.quote(checkpoint_dir.rstrip("/")), shlex.quote(discard_dir.rstrip("/"))
    k = int(iteration)
    if k < 0:
        raise ValueError(f"a checkpoint iteration is not negative: {iteration}")
    tracker = f"{d}/{TRACKER_FILE}"
    if k:
        reset = (
            f"[ -d {d}/{iteration_dir(k)} ] || {{ echo 'checkpoint {k} is missing' >&2; exit 3; }}; "
            f'tmp=$(mktemp {d}/.oellm-tracker.XXXXXX); printf %s {k} > "$tmp"; chmod 644 "$tmp"; '
            f'mv -f -- "$tmp" {tracker}; '
        )
    else:  # back to the start: Megatron starts from scratch without a tracker
        reset = f"if [ -e {tracker} ]; then mkdir -p -- {dest}; mv -f -- {tracker} {dest}/{TRACKER_FILE}; fi; "
    return (
        f"set -e; [ -d {d} ] || {{ printf 'no checkpoint directory %s\\n' {d} >&2; exit 3; }}; {reset}"
        "moved=; "
        f'for i in {d}/iter_*; do [ -d "$i" ] || continue; n=${{i##*/iter_}}; '
        'case "$n" in ""|*[!0-9]*) continue;; esac; '
        f"if [ $((10#$n)) -gt {k} ]; then mkdir -p -- {dest}; "
        f'[ ! -e {dest}/"iter_$n" ] || {{ printf "%s exists\\n" {dest}/"iter_$n" >&2; exit 3; }}; '
        f'mv -- "$i" {dest}/"iter_$n"; moved="$moved $((10#$n))"; fi; done; '
        'echo "R$moved"'
    )


def retention_script(checkpoint_dir: str, deletions: Sequence[tuple[int, Sequence[str]]]) -> str:
    """Delete `iter_N` for each (N, status files) unless the tracker names N (now) or one of the status files
    (a branch task's, `TrainingStatus`) does not say completed. Prints `D N` for each deleted, `K N` for each
    kept; a missing `iter_N` (deleted before, or moved aside by a rewind) is neither."""
    d = shlex.quote(checkpoint_dir.rstrip("/"))
    lines = [f"[ -d {d} ] || exit 0", f"t=$(head -c 64 {d}/{TRACKER_FILE} 2>/dev/null | tr -dc '0-9')"]
    for iteration, status_files in deletions:
        n = int(iteration)
        if n < 1:
            raise ValueError(f"a checkpoint iteration is positive: {iteration}")
        done = " && ".join(f"grep -qs {shlex.quote(COMPLETED)} {shlex.quote(f)}" for f in status_files) or "true"
        lines.append(
            f"if [ -d {d}/{iteration_dir(n)} ]; then "
            f'if [ "$((10#${{t:-0}}))" != {n} ] && {done}; then rm -rf -- {d}/{iteration_dir(n)} && echo "D {n}"; '
            f'else echo "K {n}"; fi; fi'
        )
    return "\n".join(lines) + "\n"


def parse_retention(stdout: str) -> tuple[list[int], list[int]]:
    """(deleted, kept) of `retention_script`'s output."""
    deleted, kept = [], []
    for line in stdout.splitlines():
        tag, _, number = line.partition(" ")
        if tag in ("D", "K") and number.isdigit():
            (deleted if tag == "D" else kept).append(int(number))
    return deleted, kept


def parse_rewind(stdout: str) -> list[int]:
    """The iterations a rewind moved aside (`rewind_script`'s last line)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("R"):
            return sorted(int(n) for n in line[1:].split())
    raise ValueError(f"no rewind report in {stdout[-200:]!r}")
