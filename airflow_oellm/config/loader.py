"""From a sweep file to validated experiments: compose, override, expand, name, resolve, check.

    sweep = load_sweep("config/sweeps/scaling_study.yaml", ["slurm.time=7200"])
    for exp in sweep.experiments:
        exp.name, exp.dag_id, exp.paths.output_dir, exp.config.backend.args

Interpolations resolve once per experiment at load time. Escaped ones (`\\${...}`, `$${...}`)
survive as `${...}` text and resolve when the run starts (`Experiment.materialize`), with the
run's frozen time, so a cooldown's timestamp is taken when it runs and retries reuse it.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException

from airflow_oellm.config import interpolation
from airflow_oellm.config.budget import (
    SWEEP_BUDGET_KEY,
    PlannedGpuHours,
    experiment_budget_issue,
    planned_gpu_hours,
    sweep_budget_issue,
)
from airflow_oellm.config.compose import Composed, Composer, config_roots
from airflow_oellm.config.diff import sweep_differences
from airflow_oellm.config.early_stop import EarlyStopRule, RulePoint, early_stop_rule
from airflow_oellm.config.errors import ConfigError, Issue, shown
from airflow_oellm.config.expressions import ExpressionError
from airflow_oellm.config.naming import (
    NamingError,
    check_name,
    check_output_root,
    dag_id,
    job_path_interpolations,
    render_template,
)
from airflow_oellm.config.noops import SweepMember, inert_axes
from airflow_oellm.config.overrides import apply_overrides, locate, parse_overrides, split_group_choices
from airflow_oellm.config.platforms import unmet_requirements
from airflow_oellm.config.resolvers import RESOLVERS, frozen_time
from airflow_oellm.config.schema import DEFAULT_NOTIFY_OUTAGE_AFTER, RootConfig
from airflow_oellm.config.secrets import notification_problems, secret_problems
from airflow_oellm.config.sweep import SweepError, SweepPoint, expand_sweep
from airflow_oellm.config.tracking import tracking_problems
from airflow_oellm.config.validate import Validator, is_unresolved, iteration_arg, learning_rate_value, schema_fields
from airflow_oellm.config.yamlio import key_line, load_yaml
from airflow_oellm.slurm.shell import ShellSafetyError, check_env_name, check_module
from airflow_oellm.slurm.states import JobState
from airflow_oellm.slurm.timespec import UNLIMITED, time_limit_seconds

# checkpoint formats megatron-core writes that the converter refuses (megatron/layout.py names them)
UNCONVERTIBLE_FORMATS = frozenset({"zarr", "torch_dcp", "fsdp_dtensor"})
_UNESCAPED_INTERPOLATION = re.compile(r"(?<!\\)\$\{")
CALLBACK_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@dataclass(frozen=True)
class ExperimentPaths:
    output_dir: str
    checkpoint_dir: str
    log_dir: str
    log_path: str
    script_dir: str
    provenance_dir: str


@dataclass
class Experiment:
    """One sweep point: stable name and paths, its typed config, and what it was made from."""

    name: str
    index: int
    sweep: str
    dag_id: str
    parameters: dict[str, Any]
    config: RootConfig
    resolved: dict[str, Any]
    unresolved: dict[str, Any]
    source_file: str
    origins: Composed = field(repr=False)

    @cached_property
    def paths(self) -> ExperimentPaths:
        e = self.config.experiment
        return ExperimentPaths(e.output_dir, e.checkpoint_dir, e.log_dir, e.log_path, e.script_dir, e.provenance_dir)

    @property
    def has_deferred(self) -> bool:
        return _contains_interpolation(self.resolved)

    def runtime_config(self, when: dt.datetime | None = None) -> dict[str, Any]:
        """The resolved config with escaped (run-time) interpolations resolved at `when` (plain data)."""
        if not self.has_deferred:
            return self.resolved
        names = set(RESOLVERS) | {"oc.env"}
        pending = interpolation.protect_shell_references(self.resolved, set(self.resolved), names)
        with frozen_time(when):
            data = _resolve(pending, self.origins)
        _typed(data, self.origins)
        return data

    def materialize(self, when: dt.datetime | None = None) -> RootConfig:
        """The typed config with escaped (run-time) interpolations resolved at `when`."""
        if not self.has_deferred:
            return self.config
        return _typed(self.runtime_config(when), self.origins)


@dataclass
class Sweep:
    name: str
    file: str
    experiments: list[Experiment]
    varying_keys: list[str]
    overrides: list[str]
    config_roots: tuple[Path, ...] = ()
    early_stop: EarlyStopRule | None = None  # sweep.early_stop

    @property
    def template_dirs(self) -> list[Path]:
        """`templates/` of each config root, searched before the package's own templates."""
        return [root / "templates" for root in self.config_roots]

    @cached_property
    def differences(self) -> dict[str, list[dict[str, Any]]]:
        """Experiment name -> how its resolved config differs from the sweep's base (config/diff.py); of
        the experiments loaded, so of the whole sweep only when all were."""
        return sweep_differences({e.name: e.resolved for e in self.experiments})

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        from airflow_oellm.config.errors import did_you_mean

        hint = did_you_mean(name, [e.name for e in self.experiments])
        raise ConfigError(Issue(f"no experiment named {name!r} in sweep '{self.name}'{hint}", file=self.file))


def retention_problems(cfg: RootConfig) -> list[tuple[str, str]]:
    """A retention that could delete nothing, or keeps for good no checkpoint ever saved: refused by name."""
    if cfg.backend.name != "megatron":
        return [("retention", f"deletes Megatron checkpoints; backend {cfg.backend.name!r} saves none")]
    try:
        save_interval = iteration_arg(cfg.backend.args, "save_interval")
    except ConfigError:
        return []  # named where the planner reads it
    if not cfg.backend.args.get("save_interval"):
        return [("retention", "deletes older checkpoints, but backend.args.save_interval is not set: one is saved")]
    keep_every = cfg.retention.keep_every if cfg.retention is not None else 0
    if save_interval and _number(keep_every) and keep_every > 0 and keep_every % save_interval:
        return [
            (
                "retention.keep_every",
                f"{keep_every} is no multiple of backend.args.save_interval ({save_interval}): "
                f"only checkpoints at multiples of {math.lcm(keep_every, save_interval)} would be kept for good",
            )
        ]
    return []


def learning_rate_problems(cfg: RootConfig) -> list[tuple[str, str]]:
    """A rewind's lowered learning rate that could change nothing, or has no rate to lower: refused by name."""
    rewind = cfg.monitoring.anomalies.rewind
    remedy, key = rewind.learning_rate, "monitoring.anomalies.rewind.learning_rate"
    if remedy is None:
        return []
    problems = []
    if _number(remedy.multiplier) and (remedy.multiplier <= 0 or remedy.multiplier == 1):
        message = f"must be above 0 and not 1 (1 changes nothing), got {remedy.multiplier}"
        problems.append((f"{key}.multiplier", message))
    if _number(remedy.iterations) and remedy.iterations < 1:
        problems.append((f"{key}.iterations", f"must be at least 1, got {remedy.iterations}"))
    if cfg.backend.name != "megatron":
        message = f"lowers a rewound Megatron training's rate; backend {cfg.backend.name!r} is never rewound"
        problems.append((key, message))
    elif _number(rewind.max_rewinds) and rewind.max_rewinds < 1:
        problems.append((key, "lowers a rewound training's rate, but rewind.max_rewinds is 0: nothing is rewound"))
    else:
        for arg in ("lr", "min_lr"):
            value = cfg.backend.args.get(arg)
            if (value is None and arg == "min_lr") or is_unresolved(value):  # unresolved: checked at run time
                continue
            if value is None:
                problems.append((f"backend.args.{arg}", f"is not set: {key} has no rate to lower"))
            elif learning_rate_value(value) is None:
                problems.append((f"backend.args.{arg}", f"must be a number for {key} to lower, got {shown(value)}"))
    return problems


def _contains_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_contains_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_interpolation(v) for v in value)
    return False


def _resolve(data: dict[str, Any], composed: Composed) -> dict[str, Any]:
    try:
        return interpolation.resolve(data, RESOLVERS)
    except interpolation.ResolveError as exc:
        raise ConfigError(composed.issue(f"cannot resolve: {exc.message}", exc.key)) from None
    except interpolation.Unsupported:
        pass
    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)  # type: ignore[return-value]
    except GrammarParseError as exc:
        key = str(getattr(exc, "full_key", "") or "")
        message = str(getattr(exc, "msg", None) or exc).splitlines()[0]
        raise ConfigError(
            composed.issue(
                f"invalid interpolation: {message} (write \\${{...}} for text the job's shell should see)", key
            )
        ) from None
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "")
        message = getattr(exc, "msg", None) or str(exc).splitlines()[0]
        raise ConfigError(composed.issue(f"cannot resolve: {message}", key)) from None
    except (ExpressionError, ValueError) as exc:
        raise ConfigError(composed.issue(f"cannot resolve: {exc}", "")) from None


def _resolve_one(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    """Resolve one key without requiring the rest of the config to resolve."""
    with frozen_time():
        try:
            return interpolation.InterpolationResolver(data, RESOLVERS).resolve_key(path)
        except interpolation.Unsupported:
            return OmegaConf.select(OmegaConf.create(data), ".".join(path))


def _typed(data: Mapping[str, Any], composed: Composed) -> RootConfig:
    validator = Validator()
    cfg = validator.check(dict(data), RootConfig)
    issues = [composed.issue(i.message, i.key) for i in validator.issues]
    if not issues:
        problems = semantic_problems(cfg, data) + unmet_requirements(cfg, composed.data)
        issues = [composed.issue(message, key) for key, message in problems]
    if issues:
        raise ConfigError(issues)
    return cfg


def _number(value: Any) -> bool:
    """A resolved number (a run-time interpolation is checked when the run resolves it)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def semantic_problems(cfg: RootConfig, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Checks beyond types: (key, message) pairs."""
    problems: list[tuple[str, str]] = []

    def at_least(key: str, value: Any, minimum: float, message: str | None = None) -> None:
        if _number(value) and value < minimum:
            problems.append((key, message or f"must be at least {minimum}, got {shown(value)}"))

    try:
        check_output_root(cfg.project.base_output_dir)
    except NamingError as exc:
        problems.append(("project.base_output_dir", str(exc)))
    problems += secret_problems(cfg.platform.secrets)
    for key in ("gpu_hour_budget", "gpu_hour_budget_per_experiment"):
        budget = getattr(cfg.project, key)
        if budget is not None and not _number(budget):
            problems.append(
                (f"project.{key}", "a budget is checked when the sweep is loaded: it cannot wait for the run")
            )
    if isinstance(cfg.slurm.time, (int, str)) and not _contains_interpolation(cfg.slurm.time):
        try:
            time_limit_seconds(cfg.slurm.time)
        except ValueError as exc:
            problems.append(("slurm.time", str(exc)))
    for key, value in (("max_outage", cfg.platform.max_outage), ("on_outage.after", cfg.platform.on_outage.after)):
        if isinstance(value, (int, str)) and not _contains_interpolation(value):
            try:
                time_limit_seconds(value)
            except ValueError as exc:
                problems.append((f"platform.{key}", str(exc)))
    problems += notification_problems(cfg.notifications)
    problems += tracking_problems(cfg, data)
    notifier = cfg.platform.on_outage
    if str(notifier.after).strip() in UNLIMITED:
        problems.append(("platform.on_outage.after", "UNLIMITED would never tell the callback: give a time"))
    if notifier.callback is None and notifier.after != DEFAULT_NOTIFY_OUTAGE_AFTER:
        problems.append(("platform.on_outage.after", "is set but notifies nobody: set platform.on_outage.callback"))
    if notifier.callback is not None and not CALLBACK_PATH.match(str(notifier.callback)):
        problems.append(
            (
                "platform.on_outage.callback",
                f"must be a dotted path `package.module.name`, not {shown(notifier.callback)}",
            )
        )
    at_least("slurm.nodes", cfg.slurm.nodes, 1)
    at_least("slurm.gpus_per_node", cfg.slurm.gpus_per_node, 0, f"must be >= 0, got {shown(cfg.slurm.gpus_per_node)}")
    at_least("slurm.ntasks_per_node", cfg.slurm.ntasks_per_node, 1)
    if cfg.slurm.cpus_per_task is not None:
        at_least("slurm.cpus_per_task", cfg.slurm.cpus_per_task, 1)
    at_least("restart.max_attempts", cfg.restart.max_attempts, 1)
    at_least("restart.retry_delay_seconds", cfg.restart.retry_delay_seconds, 0, "must be >= 0")
    m = cfg.monitoring
    at_least("monitoring.poll_interval_seconds", m.poll_interval_seconds, 1, "must be at least 1 second")
    if _number(m.poll_interval_seconds):
        at_least(
            "monitoring.inactivity_threshold_seconds",
            m.inactivity_threshold_seconds,
            m.poll_interval_seconds,
            f"must be at least monitoring.poll_interval_seconds ({m.poll_interval_seconds})",
        )
    at_least("monitoring.anomalies.rewind_margin", m.anomalies.rewind_margin, 0, "must be >= 0")
    for name in ("loss_spike", "grad_norm_spike"):
        spike, key = getattr(m.anomalies, name), f"monitoring.anomalies.{name}"
        if spike is None:
            continue
        at_least(f"{key}.min_history", spike.min_history, 2, "must be at least 2: one value has no deviation")
        if _number(spike.min_history):
            at_least(
                f"{key}.window",
                spike.window,
                spike.min_history,
                f"must be at least min_history ({spike.min_history}), or no value is ever judged",
            )
        for setting in ("threshold_sigmas", "min_rise"):
            at_least(f"{key}.{setting}", getattr(spike, setting), 0, "must be >= 0")
        at_least(f"{key}.sustain", spike.sustain, 1)
        if spike.recover_within is not None and _number(spike.sustain):
            at_least(
                f"{key}.recover_within",
                spike.recover_within,
                spike.sustain,
                f"must be at least sustain ({spike.sustain}): a spike is not known before then",
            )
    problems += learning_rate_problems(cfg)
    if cfg.retention is not None:
        at_least("retention.keep_last", cfg.retention.keep_last, 1, "must be at least 1: the newest checkpoint stays")
        at_least("retention.keep_every", cfg.retention.keep_every, 0, "must be >= 0 (0: none kept for good)")
        problems += retention_problems(cfg)
    for i, event in enumerate(m.log_events):
        if event.pattern_type == "regex" and not _contains_interpolation(event.pattern):
            try:
                compiled = re.compile(event.pattern)
            except (re.error, RecursionError, OverflowError, ValueError) as exc:
                problems.append((f"monitoring.log_events[{i}].pattern", f"invalid regex: {shown(str(exc), 200)}"))
                continue
            for target, group in event.extract_groups.items():
                if group not in compiled.groupindex:
                    problems.append(
                        (
                            f"monitoring.log_events[{i}].extract_groups.{target}",
                            f"the pattern has no group named {group!r}; its groups: "
                            f"{', '.join(compiled.groupindex) or 'none'}",
                        )
                    )
    for i, rule in enumerate(m.rules):
        for field_name in ("pattern", "node_pattern"):
            regex = getattr(rule, field_name)
            if regex is not None and not _contains_interpolation(regex):
                try:
                    re.compile(regex)
                except (re.error, RecursionError, OverflowError, ValueError) as exc:
                    problems.append((f"monitoring.rules[{i}].{field_name}", f"invalid regex: {shown(str(exc), 200)}"))
        for j, state in enumerate(rule.states):
            if JobState.parse(state) is JobState.UNKNOWN:
                problems.append(
                    (
                        f"monitoring.rules[{i}].states[{j}]",
                        f"not a SLURM job state: {shown(state)} (e.g. FAILED, TIMEOUT, CANCELLED, NODE_FAIL)",
                    )
                )
    for name in cfg.platform.env:
        try:
            check_env_name(name)
        except ShellSafetyError as exc:
            problems.append((f"platform.env.{name}", str(exc)))
    for i, module in enumerate(cfg.platform.modules):
        try:
            check_module(module)
        except ShellSafetyError as exc:
            problems.append((f"platform.modules[{i}]", str(exc)))
    ckpt_format = cfg.backend.args.get("ckpt_format") if cfg.backend.name == "megatron" else None
    if cfg.conversion.enabled and ckpt_format in UNCONVERTIBLE_FORMATS:
        problems.append(
            (
                "backend.args.ckpt_format",
                f"the converter does not read {ckpt_format} checkpoints (it reads torch_dist and torch): every "
                "conversion would fail; train with torch_dist (Megatron's default) or set conversion.enabled: false",
            )
        )
    if cfg.backend.name == "command" and not cfg.backend.command:
        problems.append(("backend.command", "backend 'command' needs a non-empty command list"))
    if cfg.platform.container.runtime != "none" and not cfg.platform.container.image:
        problems.append(("platform.container.image", f"runtime '{cfg.platform.container.runtime}' needs an image"))
    return problems


def unescaped_setup_interpolations(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`platform.setup` lines are trusted shell: config values must reach them through `env`, quoted."""
    platform = data.get("platform")
    setup = platform.get("setup") if isinstance(platform, dict) else None
    problems = []
    for i, line in enumerate(setup if isinstance(setup, list) else []):
        if isinstance(line, str) and _UNESCAPED_INTERPOLATION.search(line):
            problems.append(
                (
                    f"platform.setup[{i}]",
                    "config interpolation is not allowed in setup lines (they are raw shell); put the value in "
                    'platform.env and use "$NAME" in the line, or write \\${NAME} for a shell variable',
                )
            )
    return problems


class SweepLoader:
    """Loads one sweep file; compositions are cached per combination of group choices."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        overrides: Sequence[str] = (),
        config_dirs: Iterable[str] = (),
        enforce_budget: bool = True,
    ):
        self.path = str(Path(path))
        self.enforce_budget = enforce_budget
        self.primary = load_yaml(self.path)
        self.composer = Composer(config_roots(self.path, config_dirs))
        self.override_texts = list(overrides)
        parsed = parse_overrides(self.override_texts)
        self.groups = set(self.composer.groups())
        self.choices, self.key_overrides = split_group_choices(parsed, self.groups)
        self._compositions: dict[tuple[tuple[str, Any], ...], Composed] = {}

    def composition(self, choices: Mapping[str, Any]) -> Composed:
        cache_key = tuple(sorted(choices.items(), key=lambda kv: kv[0]))
        if cache_key not in self._compositions:
            composed = self.composer.compose(self.path, self.primary, choices)
            composed.origins.update(apply_overrides(composed.data, self.key_overrides))
            setup_problems = unescaped_setup_interpolations(composed.data)
            if setup_problems:
                raise ConfigError([composed.issue(m, k) for k, m in setup_problems])
            self._compositions[cache_key] = composed
        return self._compositions[cache_key]

    def sweep_name(self, base: Composed) -> str:
        sweep_def = base.data.get("sweep") or {}
        name = sweep_def.get("name") if isinstance(sweep_def, dict) else None
        name = name or Path(self.path).stem
        try:
            return check_name(str(name), "sweep name")
        except NamingError as exc:
            raise ConfigError(base.issue(str(exc), "sweep.name")) from None

    def load(self, only: str | None = None) -> Sweep:
        """The sweep's experiments; with `only`, just the experiment of that name (a worker running
        one of its tasks, a run's `prepare`), skipping the others' composition and validation."""
        base = self.composition(self.choices)
        sweep_name = self.sweep_name(base)
        sweep_def = base.data.get("sweep") or {}
        try:
            points = expand_sweep(sweep_def)
        except SweepError as exc:
            raise ConfigError([base.issue(i.message, i.key) for i in exc.issues]) from None
        overridden = {o.key for o in self.key_overrides}
        experiments: list[Experiment] = []
        seen: dict[str, Experiment] = {}
        issues: list[Issue] = []
        template = self._name_template(base, points)
        points_by_index = {p.index: p for p in points}
        with frozen_time():
            for point in points:
                if only is not None and self._cheap_name(point, sweep_name, template) not in (only, None):
                    continue
                try:
                    exp = self._experiment(point, sweep_name, template, overridden)
                except ConfigError as exc:
                    issues.extend(exc.issues)
                    if len(issues) >= 20:
                        break
                    continue
                if exp.name in seen:
                    other = seen[exp.name]
                    issues.append(
                        base.issue(
                            f"two experiments get the name {exp.name!r}: #{other.index} {other.parameters} and "
                            f"#{exp.index} {exp.parameters}; add the differing keys to the template",
                            "sweep.name_template",
                        )
                    )
                    continue
                seen[exp.name] = exp
                experiments.append(exp)
        if not issues and only is None:
            members = [
                SweepMember(e.index, e.parameters, points_by_index[e.index].sources, _as_run(e), e.unresolved)
                for e in experiments
            ]
            groups = {g: self.composer.options(g) for g in sorted(self.groups)}
            issues = inert_axes(members, groups, base.origin("sweep") or self.path)
        if not issues and self.enforce_budget:
            issues = budget_issues(experiments, whole_sweep=only is None)
        rule, rule_issues = early_stop_rule(
            sweep_def.get("early_stop"),
            None if only is not None else [_rule_point(e) for e in experiments],
            list(dict.fromkeys(k for p in points for k in p.values)),
        )
        issues += [base.issue(i.message, i.key) for i in rule_issues]
        if issues:
            raise ConfigError(list(dict.fromkeys(issues)))  # the same problem in every experiment: once
        return Sweep(
            sweep_name, self.path, experiments, _varying_keys(points), self.override_texts, self.composer.roots, rule
        )

    def _cheap_name(self, point: SweepPoint, sweep_name: str, template: str) -> str | None:
        """The point's experiment name without building its config (None: it needs the full build)."""
        group_choices = self._group_choices(point)
        project = self.composition({**self.choices, **group_choices}).data.get("project")
        name = project.get("name") if isinstance(project, dict) else None
        if not isinstance(name, str) or "${" in name or "project.name" in point.values:
            return None
        try:
            return render_template(
                template, {**point.values, "index": point.index, "sweep": sweep_name, "project": name}
            )
        except NamingError:
            return None

    def _group_choices(self, point: SweepPoint) -> dict[str, str | None]:
        """The point's config-group options (`model: 50M`); a group name takes an option name only."""
        choices: dict[str, str | None] = {}
        for key, value in point.values.items():
            if key not in self.groups:
                continue
            if value is not None and not isinstance(value, str):
                raise ConfigError(
                    Issue(
                        f"'{key}' is a config group: a sweep value for it is an option name "
                        f"({', '.join(self.composer.options(key)[:8])}), got {shown(value)} "
                        f"(experiment #{point.index}; for keys inside it write {key}.<key>: value)",
                        key=key,
                        file=self.path,
                        line=key_line(self.path, "sweep"),
                    )
                )
            choices[key] = value
        return choices

    def _name_template(self, base: Composed, points: list[SweepPoint]) -> str:
        sweep_def = base.data.get("sweep") or {}
        template = sweep_def.get("name_template")
        if template is None:
            # keys some points lack cannot name every experiment; a clash is then reported as such
            keys = [k for k in _varying_keys(points) if all(k in p.values for p in points)]
            if not keys:
                return "{project}"
            return "{project}_" + "_".join(f"{k.rsplit('.', 1)[-1]}{{{k}}}" for k in keys)
        if not isinstance(template, str):
            raise ConfigError(base.issue(f"must be a string, got {template!r}", "sweep.name_template"))
        if "${" in template:
            try:
                template = _resolve_one(base.data, ("sweep", "name_template"))
            except (interpolation.ResolveError, OmegaConfBaseException, ValueError) as exc:
                raise ConfigError(base.issue(f"cannot resolve: {exc}", "sweep.name_template")) from None
            if not isinstance(template, str):
                message = f"must resolve to a string, got {shown(template)}"
                raise ConfigError(base.issue(message, "sweep.name_template"))
        return template

    def _experiment(self, point: SweepPoint, sweep_name: str, template: str, overridden: set[str]) -> Experiment:
        group_choices = self._group_choices(point)
        composed = self.composition({**self.choices, **group_choices})
        # the sweep definition is not part of an experiment (and copying it per point is quadratic)
        data = copy.deepcopy({k: v for k, v in composed.data.items() if k != "sweep"})
        sweep_origin = composed.origin("sweep") or self.path
        point_origins = dict(composed.origins)
        written_at = dict(composed.written_at)
        issues = []
        for key, value in point.values.items():
            if key in group_choices:
                continue
            target = key if ("." in key or key in schema_fields(RootConfig)) else f"vars.{key}"
            if target in overridden or key in overridden:
                issues.append(
                    Issue(
                        "is swept by the sweep; an override cannot also set it (change sweep.axes instead)",
                        key=key,
                        file=sweep_origin,
                    )
                )
                continue
            if target.split(".")[0] == "experiment":
                issues.append(
                    Issue(
                        "is set by the sweep planner and cannot be swept",
                        key=key,
                        file=sweep_origin,
                        line=key_line(sweep_origin, "sweep"),
                    )
                )
                continue
            _set_path(data, target, value)
            point_origins[target] = sweep_origin
            if key in point.sources:
                written_at[target] = point.sources[key]
        if issues:
            raise ConfigError(issues)
        composed_point = Composed(data, point_origins, composed.choices, composed.files, written_at)

        project = data.get("project") if isinstance(data.get("project"), dict) else {}
        missing = [k for k in ("name", "base_output_dir") if k not in project]
        if missing:
            # no file set them: the sweep file is where they belong
            issues = [composed_point.issue("missing required key", f"project.{k}") for k in missing]
            raise ConfigError([i if i.file else Issue(i.message, i.key, self.path) for i in issues])
        fields = {
            **point.values,
            "index": point.index,
            "sweep": sweep_name,
            "project": project["name"],
        }
        try:
            name = check_name(render_template(template, fields))
        except NamingError as exc:
            # without a template of its own, the name is made from the project's name: point there
            explicit = (composed.data.get("sweep") or {}).get("name_template") is not None
            key = "sweep.name_template" if explicit else "project.name"
            raise ConfigError(composed_point.issue(f"{exc} (experiment #{point.index} {point.values})", key)) from None
        the_dag_id = dag_id(sweep_name, name)
        data["experiment"] = {
            "name": name,
            "index": point.index,
            "sweep": sweep_name,
            "dag_id": the_dag_id,
            **job_path_interpolations(name),
            "parameters": copy.deepcopy(point.values),
        }
        resolved = _resolve(data, composed_point)
        output_dir = resolved["experiment"]["output_dir"]
        try:
            resolved["experiment"]["output_dir"] = check_output_root(output_dir, "experiment output dir")
        except NamingError as exc:
            raise ConfigError(composed_point.issue(str(exc), "project.base_output_dir")) from None
        config = _typed(resolved, composed_point)
        if config.backend.name == "megatron":  # the planner counts checkpoints from these
            for key in ("train_iters", "save_interval"):
                try:
                    iteration_arg(config.backend.args, key)
                except ConfigError as exc:
                    raise ConfigError([composed_point.issue(i.message, i.key) for i in exc.issues]) from None
        return Experiment(
            name=name,
            index=point.index,
            sweep=sweep_name,
            dag_id=the_dag_id,
            parameters=dict(point.values),
            config=config,
            resolved=resolved,
            unresolved=data,
            source_file=self.path,
            origins=composed_point,
        )


def _as_run(experiment: Experiment) -> dict[str, Any]:
    """The config a run would see: run-time (escaped) interpolations resolved where they can be now."""
    if not experiment.has_deferred:
        return experiment.resolved
    try:
        return experiment.runtime_config()
    except ConfigError:  # it needs what only the run has (an environment of the worker): compare as written
        return experiment.resolved


def planned_hours(experiments: Sequence[Experiment]) -> dict[str, PlannedGpuHours]:
    """Each experiment's planned GPU-hours for a run started now (raises ConfigError naming file and key)."""
    planned = {}
    for e in experiments:
        try:
            planned[e.name] = planned_gpu_hours(e.runtime_config())
        except ConfigError as exc:
            raise ConfigError([i if i.file else e.origins.issue(i.message, i.key) for i in exc.issues]) from None
    return planned


def budget_issues(
    experiments: Sequence[Experiment], *, whole_sweep: bool, planned: Mapping[str, PlannedGpuHours] | None = None
) -> list[Issue]:
    """The GPU-hour guards, computed only where a budget is set (planning every run costs parse time);
    `planned`: the experiments' figures when the caller has them already."""
    budgets = {e.config.project.gpu_hour_budget for e in experiments}
    if not experiments:
        return []
    limited = [e for e in experiments if e.config.project.gpu_hour_budget_per_experiment is not None]
    if budgets == {None} and not limited:
        return []
    first = experiments[0]
    if len(budgets) > 1:
        return [first.origins.issue("must be the same for every experiment of the sweep", SWEEP_BUDGET_KEY)]
    if planned is None:
        planned = planned_hours(experiments if (whole_sweep and budgets != {None}) else limited)
    issues = []
    for e in limited:
        issue = experiment_budget_issue(e.config, planned[e.name], e.name)
        if issue is not None:
            issues.append(e.origins.issue(issue.message, issue.key))
    sweep_issue = sweep_budget_issue(first.config.project.gpu_hour_budget, planned) if whole_sweep else None
    if sweep_issue is not None:
        issues.append(first.origins.issue(sweep_issue.message, sweep_issue.key))
    return issues


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    path, _ = locate(data, key)
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        merged = copy.deepcopy(node[last])
        merged.update(copy.deepcopy(value))
        node[last] = merged
    else:
        node[last] = copy.deepcopy(value)


def _rule_point(e: Experiment) -> RulePoint:
    """What `sweep.early_stop` is checked against, of one experiment."""
    args = e.config.backend.args
    try:
        train_iters, eval_interval = iteration_arg(args, "train_iters"), iteration_arg(args, "eval_interval")
    except ConfigError:  # reported where the arguments are checked
        train_iters = eval_interval = None
    return RulePoint(e.name, e.parameters, train_iters, eval_interval)


def _varying_keys(points: list[SweepPoint]) -> list[str]:
    keys: list[str] = []
    for p in points:
        for k in p.values:
            if k not in keys:
                keys.append(k)
    if len(points) < 2:
        return []
    return [k for k in keys if len({repr(p.values.get(k)) for p in points}) > 1]


def load_sweep(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    config_dirs: Iterable[str] = (),
    only: str | None = None,
    enforce_budget: bool = True,
) -> Sweep:
    """Load, expand and validate a sweep file. Raises ConfigError naming file, line and key.

    `only`: load just the experiment of that name (the sweep then holds it alone, or nothing).
    `enforce_budget=False`: load a sweep over its GPU-hour budget (`plan` shows the figures).
    """
    return SweepLoader(path, overrides, config_dirs, enforce_budget).load(only)
