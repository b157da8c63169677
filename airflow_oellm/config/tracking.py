"""W&B and TensorBoard for one training or cooldown job: its W&B run, the environment its job gets, where
its offline runs are written, and the links to both. Plain functions of a resolved config.

Megatron (core 0.8 to 0.14 at least) calls `wandb.init(dir=<wandb_save_dir or save/wandb>, name=, project=,
config=)` without an id, so each resubmission would start a new W&B run. The job's `WANDB_RUN_ID` (made from
its output directory, so every attempt of a training has the same one) with `WANDB_RESUME=allow` makes all
attempts one run; a cooldown has its own output directory and so its own run.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from airflow_oellm.config.milestones import COOLDOWN, typed_job
from airflow_oellm.config.schema import WANDB_CLOUD_APP, RootConfig

# what the job environment gets from `tracking.wandb`; platform.env may not set these itself
WANDB_ENV = ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_ENTITY", "WANDB_BASE_URL")
RUN_ID_NAME_LENGTH = 40  # W&B ids may be long, but a URL is easier to read short


@dataclass(frozen=True)
class WandbRun:
    """The W&B run of one training (or cooldown), across all its attempts."""

    project: str
    name: str
    run_id: str
    entity: str | None
    save_dir: str  # Megatron's `wandb.init(dir=...)`
    offline: bool
    host: str | None
    sync: bool
    sync_command: tuple[str, ...]

    @property
    def offline_dir(self) -> str:
        """Where wandb writes its `offline-run-<time>-<id>` directories (one per attempt)."""
        return posixpath.join(self.save_dir, "wandb")

    @property
    def url(self) -> str | None:
        """The run's page; None without an entity, which the address needs."""
        if not self.entity:
            return None
        base = (self.host or WANDB_CLOUD_APP).rstrip("/")
        return f"{base}/{quote(self.entity, safe='')}/{quote(self.project, safe='')}/runs/{quote(self.run_id, safe='')}"

    @property
    def synced(self) -> bool:
        """Whether a sync task pushes its offline runs."""
        return self.offline and self.sync

    def env(self) -> dict[str, str]:
        """What the job's script exports for it."""
        env = {
            "WANDB_RUN_ID": self.run_id,
            "WANDB_RESUME": "allow",
            "WANDB_MODE": "offline" if self.offline else "online",
        }
        if self.entity:
            env["WANDB_ENTITY"] = self.entity
        if self.host:
            env["WANDB_BASE_URL"] = self.host
        return env

    def sync_env(self) -> dict[str, str]:
        """What the sync on the login node exports (the API key comes from the secrets)."""
        return {"WANDB_BASE_URL": self.host} if self.host else {}


def wandb_run_id(name: str, output_dir: str) -> str:
    """A W&B run id for the job writing `output_dir`: its name made safe, and a digest of the directory."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:RUN_ID_NAME_LENGTH] or "run"
    return f"{slug}-{hashlib.sha256(output_dir.rstrip('/').encode()).hexdigest()[:12]}"


def _arg(cfg: RootConfig, key: str) -> Any:
    value = cfg.backend.args.get(key)
    return None if value is False or value == "" else value


def wandb_run(cfg: RootConfig) -> WandbRun | None:
    """The job's W&B run: a Megatron training with `backend.args.wandb_project` (what makes Megatron log to
    W&B); None for anything else."""
    if cfg.backend.name != "megatron" or not _arg(cfg, "wandb_project"):
        return None
    save_dir = _arg(cfg, "wandb_save_dir") or posixpath.join(
        str(_arg(cfg, "save") or cfg.experiment.checkpoint_dir), "wandb"
    )
    w = cfg.tracking.wandb
    offline = w.mode == "offline" or (w.mode == "auto" and not cfg.platform.compute_internet)
    name = str(_arg(cfg, "wandb_exp_name") or cfg.experiment.name)
    return WandbRun(
        project=str(_arg(cfg, "wandb_project")),
        name=name,
        run_id=wandb_run_id(name, cfg.experiment.output_dir),
        entity=w.entity,
        save_dir=str(save_dir),
        offline=offline,
        host=w.host.rstrip("/") if w.host else None,
        sync=w.sync,
        sync_command=tuple(w.sync_command),
    )


def tensorboard_dir(cfg: RootConfig) -> str | None:
    """Where the job's TensorBoard events go (`backend.args.tensorboard_dir`), if it writes any."""
    if cfg.backend.name != "megatron":
        return None
    value = _arg(cfg, "tensorboard_dir")
    return str(value) if value else None


def tensorboard_url(cfg: RootConfig) -> str | None:
    """`tracking.tensorboard.url` for the job's log directory, when both are set."""
    logdir, template = tensorboard_dir(cfg), cfg.tracking.tensorboard.url
    if not logdir or not template:
        return None
    return template.replace("{logdir}", quote(logdir, safe=""))


def tracking_record(cfg: RootConfig) -> dict[str, Any]:
    """What the dashboard shows of a training's tracking: its W&B run (link, id, mode) and TensorBoard."""
    run = wandb_run(cfg)
    return {
        "run": cfg.experiment.name,
        "wandb": run.url if run else None,
        "wandb_run_id": run.run_id if run else None,
        "wandb_mode": None if run is None else "offline" if run.offline else "online",
        "wandb_dir": run.offline_dir if run and run.offline else None,
        "tensorboard_dir": tensorboard_dir(cfg),
        "tensorboard": tensorboard_url(cfg),
    }


def run_tracking(config: Mapping[str, Any], cooldowns: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tracking records of a run's training, then of each of its cooldowns (their `index`)."""
    jobs: list[dict[str, Any] | None] = [None, *({"kind": COOLDOWN, "cooldown": c["index"]} for c in cooldowns)]
    return [tracking_record(typed_job(config, job)) for job in jobs]


def tracking_problems(cfg: RootConfig, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Settings that would change nothing, and environment variables `tracking.wandb` owns: (key, message)."""
    problems: list[tuple[str, str]] = []
    tracking = data.get("tracking") or {}
    set_wandb = sorted(k for k in (tracking.get("wandb") or {}) if isinstance(k, str))
    run = wandb_run(cfg)
    if run is None and set_wandb:
        problems.append(
            (
                f"tracking.wandb.{set_wandb[0]}",
                "is set but nothing logs to W&B: set backend.args.wandb_project (a Megatron training)",
            )
        )
    elif run is not None and not run.offline:
        for key in ("sync", "sync_command"):
            if key in set_wandb:
                problems.append(
                    (
                        f"tracking.wandb.{key}",
                        "is set but the runs are online, so there is nothing to sync: set tracking.wandb.mode: "
                        "offline, or platform.compute_internet: false",
                    )
                )
    if "url" in (tracking.get("tensorboard") or {}) and tensorboard_dir(cfg) is None:
        problems.append(
            (
                "tracking.tensorboard.url",
                "is set but nothing writes TensorBoard logs: set backend.args.tensorboard_dir (a Megatron training)",
            )
        )
    if run is not None:
        for name in WANDB_ENV:
            if name in cfg.platform.env:
                problems.append((f"platform.env.{name}", "is set for W&B runs by tracking.wandb: set it there"))
    if cfg.tracking.tensorboard.url and "{logdir}" not in cfg.tracking.tensorboard.url:
        problems.append(("tracking.tensorboard.url", "has no {logdir}: every experiment would link the same page"))
    return problems
