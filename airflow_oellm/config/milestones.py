"""An experiment's plan: which checkpoints get converted and evaluated, where cooldowns branch off,
and the configs of those side jobs, all derived from the resolved experiment config.

Pure functions of the config: `prepare` computes them once per DAG run (after run-time
overrides), and the DAG maps its branches over the result.
"""

from __future__ import annotations

import copy
import dataclasses
import posixpath
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from airflow_oellm.config.errors import ConfigError, Issue, did_you_mean, shown
from airflow_oellm.config.naming import (
    CHECKPOINT_CONVERT_TASK,
    COOLDOWN_TRAIN_TASK,
    NamingError,
    check_name,
    job_paths,
)
from airflow_oellm.config.overrides import apply_overrides, parse_overrides
from airflow_oellm.config.schema import CooldownConfig, EvalSuiteConfig, RootConfig
from airflow_oellm.config.validate import Validator, iteration_arg, learning_rate_value
from airflow_oellm.slurm.identity import task_status_path

COOLDOWN, CONVERT, EVALUATE = "cooldown", "convert", "evaluate"  # side job kinds
# submissions of a conversion or evaluation job: they are idempotent, and one retry covers a lost
# worker or a deferral race (a job that ends within a second of its task deferring)
SIDE_JOB_ATTEMPTS = 2
# what a cooldown shares with its parent's DAG (Airflow's retries, the schedule, the project)
PARENT_SECTIONS = ("restart.", "dag.", "project.")


def typed(config: dict[str, Any]) -> RootConfig:
    validator = Validator()
    cfg = validator.check(config, RootConfig)
    if validator.issues:
        raise ConfigError(validator.issues)
    return cfg


def expected_checkpoints(train_iters: int, save_interval: int | None) -> list[int]:
    """Megatron saves every `save_interval` iterations and once more at the end of training."""
    points = set(range(save_interval, train_iters + 1, save_interval)) if save_interval else set()
    points.add(train_iters)
    return sorted(points)


def suite_iterations(suite: EvalSuiteConfig, checkpoints: list[int], final: int) -> list[int]:
    if suite.when == "final":
        return [final]
    if suite.when == "interval":
        every = suite.every_iterations or 0
        return [c for c in checkpoints if every and c % every == 0]
    return list(checkpoints)


def hf_dir(output_dir: str, iteration: int) -> str:
    return f"{output_dir}/hf/iter_{iteration:07d}"


def eval_file(output_dir: str, iteration: int, suite: str) -> str:
    return f"{output_dir}/evaluations/iter_{iteration:07d}/{suite}.json"


class CheckpointBranch(TypedDict):
    """One checkpoint's branch of a run: convert it, then evaluate these suites. The DAG's `checkpoint`
    task group takes exactly these keys (dag_factory/builder.py)."""

    iteration: int
    label: str  # how the UI labels the branch
    suites: list[str]
    cooldown: int | None  # the cooldown whose checkpoint it is, or None: the training's
    checkpoint_dir: str
    output_dir: str


class CooldownBranch(TypedDict):
    """One cooldown of a run: train from the parent's checkpoint `at`, then convert and evaluate its
    last. The DAG's `cooldown` task group takes exactly these keys."""

    index: int
    name: str
    at: int
    parent_checkpoint_dir: str
    parent_output_dir: str
    output_dir: str
    checkpoint_dir: str
    final_iteration: int
    suites: list[str]


@dataclass
class Milestones:
    """JSON-safe (it travels as XCom): lists of dicts the DAG maps its branches over."""

    checkpoints: list[int]
    evaluations: list[CheckpointBranch] = field(default_factory=list)  # one per converted checkpoint
    cooldowns: list[CooldownBranch] = field(default_factory=list)


def side_job_dir(output_dir: str, kind: str, iteration: int) -> str:
    """A conversion's or evaluation's own output directory, beside the training's."""
    return f"{output_dir}/jobs/{kind}_iter_{iteration:07d}"


def _side_job(
    parent: dict[str, Any], cfg: RootConfig, kind: str, iteration: int, argv: list[str], resources: Any
) -> dict[str, Any]:
    """A command job (conversion or evaluation) with its own output directory beside the training's."""
    job = copy.deepcopy(parent)
    exp = job["experiment"]
    name = f"{exp['name']}-{kind}-{iteration}"
    out = side_job_dir(exp["output_dir"], kind, iteration)
    exp.update(job_paths(name, out))
    job["backend"].update(name="command", launcher="none", command=argv, args={})
    slurm = job["slurm"]
    slurm.update(
        time=resources.time,
        nodes=resources.nodes,
        gpus_per_node=resources.gpus_per_node,
        ntasks_per_node=1,
        exclusive=False,
        signal=None,
    )
    for key in ("cpus_per_task", "mem", "partition"):
        if getattr(resources, key) is not None:
            slurm[key] = getattr(resources, key)
    job["monitoring"] = {
        **job.get("monitoring", {}),
        "inactivity_threshold_seconds": 10 * 24 * 3600,
        "output_paths": [],
        "log_events": [],
    }
    job["cooldowns"] = []
    job["restart"] = {"max_attempts": SIDE_JOB_ATTEMPTS, "retry_delay_seconds": cfg.restart.retry_delay_seconds}
    return job


def conversion_job(parent: dict[str, Any], cfg: RootConfig, iteration: int) -> dict[str, Any]:
    c = cfg.conversion
    argv = [
        *c.command,
        "--megatron-checkpoint",
        cfg.experiment.checkpoint_dir,
        "--iteration",
        str(iteration),
        "--output-dir",
        hf_dir(cfg.experiment.output_dir, iteration),
        "--model-type",
        c.model_type,
        "--dtype",
        c.dtype,
        "--max-shard-size",
        c.max_shard_size,
    ]
    return _side_job(parent, cfg, CONVERT, iteration, argv, c.resources)


def evaluation_job(
    parent: dict[str, Any], cfg: RootConfig, iteration: int, suites: list[EvalSuiteConfig]
) -> dict[str, Any]:
    """One job evaluating a converted checkpoint with every suite it is due for, one after the other."""
    e = cfg.evaluation
    out = cfg.experiment.output_dir
    commands = [
        shlex.join(
            [
                *e.command,
                "--hf-dir",
                hf_dir(out, iteration),
                "--output-file",
                eval_file(out, iteration, suite.name),
                "--iteration",
                str(iteration),
                "--tasks",
                ",".join(suite.tasks),
                *suite.args,
            ]
        )
        for suite in suites
    ]
    argv = ["bash", "-c", "set -e; " + "; ".join(commands)]  # every word quoted by shlex.join
    return _side_job(parent, cfg, EVALUATE, iteration, argv, e.resources)


def cooldown_config(
    parent: dict[str, Any], cfg: RootConfig, spec: CooldownConfig, checkpoints: list[int]
) -> dict[str, Any]:
    """The parent's resolved config, loading from its checkpoint `at`, in its own output dir, plus overrides."""
    if spec.at not in checkpoints:
        raise ConfigError(
            Issue(
                f"cooldown at {spec.at} is not a checkpoint iteration of the training "
                f"(checkpoints: {_short(checkpoints)})",
                key="cooldowns",
            )
        )
    suffix = spec.name or f"cooldown_{spec.at}"
    name = f"{cfg.experiment.name}_{suffix}"
    try:
        check_name(name, "cooldown name")
    except NamingError as exc:
        raise ConfigError(Issue(str(exc), key="cooldowns")) from None
    job = copy.deepcopy(parent)
    out = posixpath.join(posixpath.dirname(cfg.experiment.output_dir), name)
    paths = job_paths(name, out)
    job["experiment"].update(paths)
    args = job["backend"].setdefault("args", {})
    if cfg.backend.name == "megatron":
        args.update(
            load=cfg.experiment.checkpoint_dir,
            save=paths["checkpoint_dir"],
            ckpt_step=spec.at,
            override_opt_param_scheduler=True,
        )
        for key in ("wandb_exp_name", "tensorboard_dir", "wandb_save_dir"):
            if key in args:
                args[key] = {
                    "wandb_exp_name": name,
                    "tensorboard_dir": f"{out}/tensorboard",
                    "wandb_save_dir": f"{out}/wandb",
                }[key]
    job["cooldowns"] = []  # a cooldown never branches again
    job["monitoring"]["output_paths"] = [f"{out}/checkpoints/latest_checkpointed_iteration.txt"]
    try:
        overrides = parse_overrides(spec.overrides)
        fixed = [o for o in overrides if o.key.startswith(PARENT_SECTIONS)]
        if fixed:
            raise ConfigError(
                Issue(
                    f"a cooldown is a task of its parent's DAG, which sets its retries, schedule and project: "
                    f"{', '.join(shown(o.text) for o in fixed)} would change nothing",
                    key=fixed[0].key,
                )
            )
        apply_overrides(job, overrides)
    except ConfigError as exc:
        raise ConfigError(
            [Issue(i.message, f"cooldowns[at={spec.at}].overrides: {i.key}") for i in exc.issues]
        ) from None
    return job


def with_cooldown_points(config: dict[str, Any], points: list[int]) -> dict[str, Any]:
    """The config with cooldowns at `points` (a run's choice): a point that has a cooldown keeps it,
    a new one copies the settings of the first training cooldown under its default name."""
    specs = {int(c["at"]): c for c in config.get("cooldowns") or []}
    template = next((c for c in specs.values() if c.get("train", True)), None)
    cooldowns = []
    for at in dict.fromkeys(int(p) for p in points):
        if at in specs:
            cooldowns.append(specs[at])
        elif template is None:
            raise ConfigError(Issue(f"no training cooldown to copy for the new point {at}", key="cooldowns.at"))
        else:
            cooldowns.append({**copy.deepcopy(template), "at": at, "name": None})
    return {**config, "cooldowns": cooldowns}


def resume_own_checkpoint(cfg: RootConfig, own_checkpoint: int | None) -> RootConfig:
    """A job that loads another run's checkpoint (a cooldown: `load` = the parent's, `ckpt_step` = k)
    resumes from its own `save` directory once that holds a checkpoint, instead of starting over."""
    args = cfg.backend.args
    if cfg.backend.name != "megatron" or own_checkpoint is None or args.get("load") in (None, args.get("save")):
        return cfg
    resumed = {k: v for k, v in args.items() if k != "ckpt_step"}
    resumed["load"] = args.get("save")
    return dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, args=resumed))


def skipping_iterations(cfg: RootConfig, iterations: Sequence[int]) -> RootConfig:
    """A Megatron job that also skips `iterations` (`--iterations-to-skip`, beside any the config lists)."""
    if cfg.backend.name != "megatron" or not iterations:
        return cfg
    listed = cfg.backend.args.get("iterations_to_skip") or []
    listed = listed if isinstance(listed, list) else [listed]
    args = {**cfg.backend.args, "iterations_to_skip": sorted({*map(int, listed), *iterations})}
    return dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, args=args))


def with_learning_rate(cfg: RootConfig, multiplier: float, stop_at: int | None) -> RootConfig:
    """A Megatron job whose scheduler takes the configured learning rates times `multiplier`, not the ones its
    checkpoint holds (`--override-opt_param-scheduler`), and that stops with a save at iteration `stop_at`
    (`--exit-interval`: Megatron stops where the iteration is a multiple of it; the job resumes below it)."""
    if cfg.backend.name != "megatron":
        return cfg
    args: dict[str, Any] = {**cfg.backend.args, "override_opt_param_scheduler": True}
    for name in ("lr", "min_lr"):
        rate = learning_rate_value(args.get(name))
        if rate is not None and multiplier != 1.0:
            args[name] = rate * multiplier
    if stop_at is not None:
        args["exit_interval"] = stop_at
    return dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, args=args))


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}, {values[1]}, ..., {values[-1]}"


def plan(config: dict[str, Any]) -> Milestones:
    """Milestones of a resolved experiment config (raises ConfigError naming the key).

    Entries are small: the DAG's mapped tasks rebuild each side job's config with `job_config`.
    """
    return plan_runs(config).milestones


@dataclass
class PlannedRuns:
    """A run's milestones with the typed configs they were made from (not for XCom)."""

    config: RootConfig
    milestones: Milestones
    cooldowns: list[RootConfig] = field(default_factory=list)  # one per `milestones.cooldowns` entry


def plan_runs(config: dict[str, Any]) -> PlannedRuns:
    """`plan`, keeping the experiment's and each training cooldown's typed config."""
    cfg = typed(config)
    args = cfg.backend.args
    if cfg.backend.name != "megatron":
        return PlannedRuns(cfg, Milestones(checkpoints=[]))
    train_iters = iteration_arg(args, "train_iters") or 0
    if train_iters <= 0:
        return PlannedRuns(cfg, Milestones(checkpoints=[]))
    checkpoints = expected_checkpoints(train_iters, iteration_arg(args, "save_interval"))
    milestones = Milestones(checkpoints=checkpoints)
    runs = PlannedRuns(cfg, milestones)
    milestones.evaluations = _evaluations(cfg, checkpoints, train_iters, None, cooldown=None)
    known = [s.name for s in cfg.evaluation.suites]
    for index, spec in enumerate(cfg.cooldowns):
        unknown = [name for name in spec.suites or [] if name not in known]
        if unknown:
            raise ConfigError(
                Issue(f"no evaluation suite named {unknown[0]!r}{did_you_mean(unknown[0], known)}", key="cooldowns")
            )
        child = typed(cooldown_config(config, cfg, spec, checkpoints))
        if not spec.train:  # evaluation only, of the parent's checkpoint `at` (the seed guide's 10k case)
            _add_suites(milestones.evaluations, _evaluations(cfg, [spec.at], spec.at, spec.suites, cooldown=None))
            continue
        final = iteration_arg(child.backend.args, "train_iters") or 0
        evals = _evaluations(child, [final], final, spec.suites, cooldown=index)
        milestones.cooldowns.append(
            CooldownBranch(
                index=index,
                name=child.experiment.name,
                at=spec.at,
                parent_checkpoint_dir=cfg.experiment.checkpoint_dir,
                parent_output_dir=cfg.experiment.output_dir,
                output_dir=child.experiment.output_dir,
                checkpoint_dir=child.experiment.checkpoint_dir,
                final_iteration=final,
                suites=evals[0]["suites"] if evals else [],
            )
        )
        runs.cooldowns.append(child)
    return runs


def retention_branches(config: dict[str, Any]) -> dict[int, list[str]]:
    """For checkpoint retention: the status files of the branch tasks that start from each of the training's
    own checkpoints (its conversion; a cooldown from it), which must say completed before it may go."""
    runs = plan_runs(config)
    cfg, branches = runs.config, {}
    if cfg.conversion.enabled:
        for entry in runs.milestones.evaluations:
            if entry["cooldown"] is None:
                out = side_job_dir(cfg.experiment.output_dir, CONVERT, entry["iteration"])
                branches.setdefault(entry["iteration"], []).append(task_status_path(out, CHECKPOINT_CONVERT_TASK))
    for cooldown in runs.milestones.cooldowns:
        status = task_status_path(cooldown["output_dir"], COOLDOWN_TRAIN_TASK)
        branches.setdefault(cooldown["at"], []).append(status)
    return branches


def _add_suites(evaluations: list[CheckpointBranch], extra: list[CheckpointBranch]) -> None:
    """Merge evaluation entries: one branch per checkpoint, each suite once."""
    for entry in extra:
        same = next((e for e in evaluations if e["iteration"] == entry["iteration"]), None)
        if same is None:
            evaluations.append(entry)
        else:
            same["suites"] += [s for s in entry["suites"] if s not in same["suites"]]
    evaluations.sort(key=lambda e: e["iteration"])


def _evaluations(
    cfg: RootConfig, checkpoints: list[int], final: int, only: list[str] | None, cooldown: int | None
) -> list[CheckpointBranch]:
    if not cfg.conversion.enabled:
        return []
    suites = [s for s in cfg.evaluation.suites if only is None or s.name in only] if cfg.evaluation.enabled else []
    by_iteration: dict[int, list[str]] = {}
    for suite in suites:
        for iteration in suite_iterations(suite, checkpoints, final):
            by_iteration.setdefault(iteration, []).append(suite.name)
    return [
        CheckpointBranch(
            iteration=it,
            label=f"iter {it}",
            suites=names,
            cooldown=cooldown,
            checkpoint_dir=cfg.experiment.checkpoint_dir,
            output_dir=cfg.experiment.output_dir,
        )
        for it, names in sorted(by_iteration.items())
    ]


def _job_run(config: dict[str, Any], job: dict[str, Any]) -> tuple[dict[str, Any], RootConfig]:
    """The run a job belongs to: the experiment's training, or the cooldown `job["cooldown"]`."""
    cfg = typed(config)
    if job.get("cooldown") is None:
        return config, cfg
    index = int(job["cooldown"])
    if not 0 <= index < len(cfg.cooldowns):
        raise ConfigError(Issue(f"no cooldown {index}: the experiment has {len(cfg.cooldowns)}", key="cooldowns"))
    spec = cfg.cooldowns[index]
    if job["kind"] != COOLDOWN and not spec.train:
        return config, cfg  # an evaluation-only cooldown evaluates the parent's checkpoint
    train_iters = iteration_arg(cfg.backend.args, "train_iters") or 0
    base = cooldown_config(
        config, cfg, spec, expected_checkpoints(train_iters, iteration_arg(cfg.backend.args, "save_interval"))
    )
    return base, typed(base)


def evaluation_files(config: dict[str, Any], job: dict[str, Any]) -> dict[str, str]:
    """Suite -> the result file an evaluation job (`job_config`'s `evaluate` kind) writes."""
    _, cfg = _job_run(config, job)
    return {suite: eval_file(cfg.experiment.output_dir, int(job["iteration"]), suite) for suite in job["suites"]}


def job_config(config: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The config of one side job of an experiment, rebuilt from the experiment's resolved config.

    `job`: `{"kind": "cooldown", "cooldown": i}`, `{"kind": "convert", "iteration": n, "cooldown": i|None}`
    or `{"kind": "evaluate", "iteration": n, "suites": [names], "cooldown": i|None}`.
    """
    base, cfg = _job_run(config, job)
    kind = job["kind"]
    if kind == COOLDOWN:
        return base
    if kind == CONVERT:
        return conversion_job(base, cfg, int(job["iteration"]))
    if kind == EVALUATE:
        known = {s.name: s for s in cfg.evaluation.suites}
        missing = [name for name in job["suites"] if name not in known]
        if missing:
            raise ConfigError(Issue(f"no evaluation suite named {missing[0]!r}", key="evaluation.suites"))
        return evaluation_job(base, cfg, int(job["iteration"]), [known[name] for name in job["suites"]])
    raise ConfigError(Issue(f"unknown side job kind {kind!r}", key="job"))


def typed_job(experiment: Mapping[str, Any], job: Mapping[str, Any] | None = None) -> RootConfig:
    """The typed config of an experiment's training, or of its side job `job` (ConfigError if invalid)."""
    return typed(job_config(dict(experiment), dict(job)) if job else dict(experiment))
