"""Render an experiment's sbatch script from Jinja2 templates.

Templates live in the package's `templates/sbatch/` (a base template, and one per platform that
extends it) and may be added or replaced from a config root's `templates/` directory. The
environment is strict (`StrictUndefined`) and every `{{ value }}` is shell-quoted on output
unless it is `ShellSafe` text built by `shell.py`; so a value can never become code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

import airflow_oellm
from airflow_oellm.config.milestones import Milestones, job_config, typed
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.config.tracking import wandb_run
from airflow_oellm.slurm import shell
from airflow_oellm.slurm.shell import PROTECTED_DIRECTIVES, ShellSafe, ShellSafetyError
from airflow_oellm.slurm.timespec import format_slurm_time, time_limit_seconds

PACKAGE_TEMPLATES = Path(airflow_oellm.__file__).resolve().parent / "templates" / "sbatch"
IDENTITY_PREFIX = "oellm"


class RenderError(ValueError):
    """A config value that cannot be put into a job script safely, naming the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def _finalize(value: Any) -> Any:
    if isinstance(value, ShellSafe):
        return value
    if isinstance(value, jinja2.Undefined):
        return value
    return shell.quote(value)


def environment(template_dirs: Sequence[str | os.PathLike[str]] = ()) -> jinja2.Environment:
    search = [str(d) for d in template_dirs if Path(d).is_dir()] + [str(PACKAGE_TEMPLATES)]
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@dataclass(frozen=True)
class JobSpec:
    """What a submission adds to the config: the identity comment and per-attempt extras."""

    job_name: str | None = None
    comment: str | None = None
    exclude: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)


def default_comment(cfg: RootConfig) -> str:
    return f"{IDENTITY_PREFIX}:{cfg.experiment.dag_id}"


def sbatch_options(cfg: RootConfig, spec: JobSpec) -> dict[str, Any]:
    """Ordered `#SBATCH` options: naming rules first, then resources, then the config's own.

    Every value is checked here, so an error names the config key it came from.
    """
    s = cfg.slurm
    exp = cfg.experiment
    try:
        seconds = time_limit_seconds(s.time)
    except ValueError as exc:
        raise RenderError("slurm.time", str(exc)) from None
    entries: list[tuple[str, str, Any]] = [
        ("experiment.name", "job-name", spec.job_name or exp.name),
        ("experiment.dag_id", "comment", spec.comment or default_comment(cfg)),
        ("experiment.log_path", "output", exp.log_path),
        ("experiment.log_path", "error", exp.log_path),
        ("slurm.open_mode", "open-mode", s.open_mode),
        ("slurm.nodes", "nodes", s.nodes),
        ("slurm.ntasks_per_node", "ntasks-per-node", s.ntasks_per_node),
        ("slurm.gpus_per_node", "gpus-per-node", s.gpus_per_node if s.gpus_per_node > 0 else None),
        ("slurm.cpus_per_task", "cpus-per-task", s.cpus_per_task),
        ("slurm.mem", "mem", s.mem),
        ("slurm.time", "time", "UNLIMITED" if seconds is None else format_slurm_time(seconds)),
        ("slurm.partition", "partition", s.partition),
        ("slurm.account", "account", s.account),
        ("slurm.qos", "qos", s.qos),
        ("slurm.constraint", "constraint", s.constraint),
        ("slurm.exclude", "exclude", ",".join(dict.fromkeys([*s.exclude, *spec.exclude])) or None),
        ("slurm.exclusive", "exclusive", s.exclusive),
        ("slurm.signal", "signal", s.signal),
    ]
    user: list[tuple[str, str, Any]] = [(f"slurm.directives.{k}", k, v) for k, v in s.directives.items()]
    for i, line in enumerate(s.extra_directives):
        try:
            name, value = shell.parse_extra_directive(line)
        except ShellSafetyError as exc:
            raise RenderError(f"slurm.extra_directives[{i}]", str(exc)) from None
        user.append((f"slurm.extra_directives[{i}]", name, value))
    options: dict[str, Any] = {}
    for key, raw_name, value in entries + user:
        try:
            name = shell.directive_name(raw_name)
            if value is not None and not isinstance(value, bool):
                shell.directive_value(name, value)
        except ShellSafetyError as exc:
            raise RenderError(key, str(exc)) from None
        if (key, raw_name, value) in user and name in PROTECTED_DIRECTIVES:
            raise RenderError(key, f"--{name} is set by airflow-oellm's naming rules and cannot be changed")
        options[name] = value
    return options


# Megatron's flags whose names mix dashes and underscores: core up to 0.14 knows only this spelling (0.15+ take
# the all-dashes one too), so these keys render to it
MEGATRON_SPELLINGS = {
    "override_opt_param_scheduler": "--override-opt_param-scheduler",
    "use_checkpoint_opt_param_scheduler": "--use-checkpoint-opt_param-scheduler",
}


def _launch(cfg: RootConfig) -> ShellSafe:
    """The command line that starts training, quoted word by word."""
    b = cfg.backend
    q = shell.expandable
    try:
        if b.name == "megatron":
            entry = f"{b.megatron_path.rstrip('/')}/{b.entrypoint}" if b.megatron_path else b.entrypoint
            program = [q(entry), *shell.cli_flags(b.args, spellings=MEGATRON_SPELLINGS)]
            python = [q(b.python)]
        else:
            program = [q(word) for word in b.command]
            python = []
    except ShellSafetyError as exc:
        raise RenderError("backend.args" if b.name == "megatron" else "backend.command", str(exc)) from None

    container: list[str] = []
    c = cfg.platform.container
    if c.runtime != "none":
        container = [q(c.runtime), "exec"]
        if c.binds:
            container += ["--bind", q(",".join(c.binds))]
        container += [q(a) for a in c.args] + [q(c.image)]

    srun_opts: dict[str, Any] = {}
    if cfg.srun.cpu_bind:
        srun_opts["cpu-bind"] = cfg.srun.cpu_bind
    srun_opts.update(cfg.srun.args)
    try:
        srun_flags = [
            f"--{shell.directive_name(k)}" + ("" if v is True else f"={q(v)}")
            for k, v in srun_opts.items()
            if v not in (None, False)
        ]
    except ShellSafetyError as exc:
        raise RenderError("srun.args", str(exc)) from None

    if cfg.platform.batch_system == "local-process" and b.launcher != "none":
        raise RenderError(
            "backend.launcher",
            f"{b.launcher!r} needs srun, which the local-process batch system does not have; use none",
        )
    if b.launcher == "none":
        words = container + python + program
    elif b.launcher == "srun":
        # one task per GPU: map SLURM's task ids to the variables torch.distributed reads
        rank_env = (
            'bash -c \'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" '
            'WORLD_SIZE="$SLURM_NTASKS"; exec "$@"\' oellm-launch'
        )
        words = ["srun", *srun_flags, *container, rank_env, *python, *program]
    else:
        nproc = max(cfg.slurm.gpus_per_node, 1)
        torchrun = [
            "torchrun",
            '--nnodes="$SLURM_NNODES"',
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
            '--rdzv-id="$SLURM_JOB_ID"',
        ]
        if b.name == "command":
            torchrun.append("--no-python")
        words = ["srun", "--ntasks-per-node=1", *srun_flags, *container, *torchrun, *program]
    return shell.join_words(words)


def render_sbatch(
    cfg: RootConfig,
    spec: JobSpec | None = None,
    *,
    template_dirs: Iterable[str | os.PathLike[str]] = (),
    template: str | None = None,
) -> str:
    """The complete sbatch script for a resolved experiment config."""
    spec = spec or JobSpec()
    options = sbatch_options(cfg, spec)
    try:
        directives = shell.directive_lines(options)
    except ShellSafetyError as exc:
        raise RenderError("slurm", str(exc)) from None
    try:
        wandb = wandb_run(cfg)
        env_lines = shell.export_lines({**cfg.platform.env, **(wandb.env() if wandb else {}), **spec.extra_env})
    except ShellSafetyError as exc:
        raise RenderError("platform.env", str(exc)) from None
    try:
        modules = [ShellSafe(shell.check_module(m)) for m in cfg.platform.modules]
    except ShellSafetyError as exc:
        raise RenderError("platform.modules", str(exc)) from None
    exp = cfg.experiment
    context = {
        "version": airflow_oellm.__version__,
        "cfg": cfg,
        "exp": exp,
        "directives": directives,
        "env_exports": env_lines,
        "modules": modules,
        "setup": [ShellSafe(line) for line in cfg.platform.setup],
        "launch": _launch(cfg),
        "workdir": cfg.backend.workdir or exp.output_dir,
        "launcher": cfg.backend.launcher,
    }
    env = environment(list(template_dirs))
    name = template or cfg.platform.template
    try:
        return env.get_template(name).render(context)
    except jinja2.TemplateNotFound:
        raise RenderError("platform.template", f"template {name!r} not found in {env.loader.searchpath}") from None  # type: ignore[union-attr]
    except jinja2.UndefinedError as exc:
        raise RenderError("platform.template", f"template {name!r}: {exc.message}") from None


def render_run_scripts(
    config: dict[str, Any], milestones: Milestones, template_dirs: Iterable[str | os.PathLike[str]] = ()
) -> list[str]:
    """Every kind of script a run submits (training, each cooldown, one conversion and one
    evaluation), so a bad value fails before the first job does. Raises RenderError/ConfigError."""
    jobs = [config]
    jobs += [job_config(config, {"kind": "cooldown", "cooldown": c["index"]}) for c in milestones.cooldowns]
    for e in milestones.evaluations[:1]:
        jobs.append(job_config(config, {"kind": "convert", "iteration": e["iteration"], "cooldown": e["cooldown"]}))
        jobs.append(job_config(config, {"kind": "evaluate", **e}))
    return [render_sbatch(typed(job), template_dirs=template_dirs) for job in jobs]
