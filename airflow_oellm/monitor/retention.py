"""Checkpoint retention (`retention`): which of a training's checkpoints may be deleted once a new one is
complete. Labs delete old checkpoints to stay within quota; done by hand, it is easy to delete the one a
rewind or a branch still needs. Pure: the watch decides, `megatron/checkpoints.retention_script` deletes.

Kept, whatever else holds:
- the newest `keep_last` complete checkpoints, and every multiple of `keep_every` iterations;
- the checkpoint the tracker names (Megatron resumes from it);
- what a rewind could load (`AnomalyDetector.rewind_needs`): the target of an anomaly still going on,
  and the one an anomaly beginning with the next log interval would go back to;
- a checkpoint a branch has not consumed yet (its conversion, a cooldown starting from it): kept until the
  status file of each branch's task says completed, checked where the checkpoints are, at the moment of
  deleting (a branch that failed for good keeps its checkpoint: deleting is never a guess).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_oellm.config.milestones import expected_checkpoints
from airflow_oellm.config.schema import RetentionConfig, RootConfig
from airflow_oellm.config.validate import iteration_arg
from airflow_oellm.megatron.size import CheckpointSize, checkpoint_size


@dataclass(frozen=True)
class RetentionSettings:
    """`retention` of the config, as the watch gets it."""

    keep_last: int
    keep_every: int = 0  # 0: no checkpoint is kept for good by its iteration

    def __post_init__(self) -> None:
        if self.keep_last < 1 or self.keep_every < 0:
            raise ValueError(f"keep_last >= 1 and keep_every >= 0, not {self.keep_last} and {self.keep_every}")

    @classmethod
    def from_config(cls, config: RetentionConfig | None) -> RetentionSettings | None:
        return cls(config.keep_last, config.keep_every) if config is not None else None

    def to_dict(self) -> dict[str, int]:
        return {"keep_last": self.keep_last, "keep_every": self.keep_every}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RetentionSettings | None:
        return cls(int(data["keep_last"]), int(data.get("keep_every", 0))) if data else None


@dataclass(frozen=True)
class Deletion:
    """A checkpoint to delete once the status file of each branch from it (`branches`) says completed."""

    iteration: int
    branches: tuple[str, ...] = ()


def kept_for_good(iteration: int, settings: RetentionSettings) -> bool:
    return settings.keep_every > 0 and iteration % settings.keep_every == 0


def deletions(
    complete: Collection[int],
    settings: RetentionSettings,
    *,
    tracker: int | None,
    rewind_needs: Iterable[int] = (),
    branches: Mapping[int, Sequence[str]] | None = None,
) -> list[Deletion]:
    """The complete checkpoints that may go, oldest first; `branches` maps an iteration to the status files
    of the branch tasks that start from it."""
    newest = sorted(complete)[-settings.keep_last :]
    keep = {*newest, *rewind_needs}
    if tracker is not None:
        keep.add(tracker)
    branches = branches or {}
    return [
        Deletion(i, tuple(branches.get(i, ())))
        for i in sorted(complete)
        if i not in keep and not kept_for_good(i, settings)
    ]


def retention_notice(checkpoint_dir: str, deleted: Sequence[int], kept: Sequence[int]) -> str:
    """What a retention pass did, for the task log."""
    parts = [f"deleted checkpoint(s) {', '.join(map(str, deleted))}" if deleted else "deleted no checkpoint"]
    if kept:
        parts.append(f"kept {', '.join(map(str, kept))} (a branch has not completed from it, or the tracker names it)")
    return f"retention in {checkpoint_dir}: {'; '.join(parts)}"


def most_kept(saved: Sequence[int], settings: RetentionSettings, branch_points: Collection[int] = ()) -> int:
    """An upper bound of how many checkpoints exist at once while training: the newest `keep_last`, the ones
    kept for good so far, the rewind target and the branch points not consumed (at worst, all of them)."""
    bound = 0
    ordered = sorted(saved)
    for count in range(1, len(ordered) + 1):
        so_far = ordered[:count]
        held = {*so_far[-settings.keep_last :], *(i for i in so_far if kept_for_good(i, settings))}
        held |= {i for i in so_far if i in branch_points}
        bound = max(bound, len(held) + (1 if len(so_far) > len(held) else 0))  # + a rewind target among the rest
    return bound


@dataclass(frozen=True)
class DiskPlan:
    """What `plan` says of a training's own checkpoints (a cooldown's come on top)."""

    saved: int  # checkpoints the training saves
    held: int  # at most at once: all of them, or with retention while conversions keep up with the saves
    size: CheckpointSize | None  # each (None: the model's shape is not in the arguments)
    retained: bool

    def text(self) -> str:
        size = self.size.text() if self.size is not None else "? B"
        if not self.retained:
            return f"{self.saved} x {size}"
        return f"{self.held} of {self.saved} x {size}"

    def record(self) -> dict[str, Any]:
        each = self.size.bytes if self.size is not None else None
        return {
            "saved": self.saved,
            "held_at_most": self.held,
            "bytes_each": each,
            "bytes_each_complete": self.size.complete if self.size is not None else None,
            "bytes_at_most": each * self.held if each is not None else None,
            "retention": self.retained,
            "text": self.text() + (f" = {CheckpointSize(each * self.held, self.size.complete).text()}" if each else ""),
        }


def disk_plan(cfg: RootConfig) -> DiskPlan | None:
    """The training's checkpoints and the disk they hold at most; None for a backend that saves none."""
    args = cfg.backend.args
    if cfg.backend.name != "megatron":
        return None
    saved = expected_checkpoints(iteration_arg(args, "train_iters") or 0, iteration_arg(args, "save_interval"))
    settings = RetentionSettings.from_config(cfg.retention)
    held = len(saved) if settings is None else most_kept(saved, settings, {c.at for c in cfg.cooldowns})
    return DiskPlan(len(saved), held, checkpoint_size(args), settings is not None)
