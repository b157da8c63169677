"""`airflow-oellm migrate`: the seed tool's (oellm-autoexp) config files as one sweep file of ours.

Each seed file is recognised by its content (`class_name`, `axes`, `log_events`, `sbatch`, ...) and read
key by key through the table of its kind (`SWEEP_KEYS`, `PROJECT_KEYS`, `SLURM_KEYS`, `MONITORING_KEYS`,
`ROOT_KEYS`): a key becomes a key of the sweep, or a note saying why not (`file:line: key: reason`).
A key no table knows is a note too, so nothing is dropped silently.

What the seed tool did with actions on log events are sections here: a conversion command is
`conversion:`, an evaluation of checkpoints is a suite of `evaluation.suites` (its conditions give
`when`), a follow-up run from one iteration is a cooldown, restart conditions are `restart:`. Sweep
axes are wired to the keys they meant (`learning_rate` -> `backend.args.lr`), since a bare name reaches
no job here. Every value is checked against the schema before it is written.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from airflow_oellm.config.compose import Composer, config_roots, deep_merge
from airflow_oellm.config.errors import ConfigError, Issue, join_key, shown
from airflow_oellm.config.milestones import expected_checkpoints
from airflow_oellm.config.naming import NamingError, check_name, check_output_root, render_template
from airflow_oellm.config.noops import KeySuggestion, suggested_key
from airflow_oellm.config.resolvers import RESOLVERS
from airflow_oellm.config.schema import PROTECTED_SECTIONS, RootConfig, SlurmConfig
from airflow_oellm.config.sweep import SweepError, expand_sweep, flatten_mapping
from airflow_oellm.config.validate import Validator, schema_fields
from airflow_oellm.config.yamlio import key_line, load_yaml
from airflow_oellm.megatron.logs import BUILTIN_EVENTS
from airflow_oellm.slurm.shell import ShellSafetyError, check_env_name, directive_value, parse_extra_directive
from airflow_oellm.slurm.timespec import time_limit_seconds

# platforms with a file of ours (config/platform/<name>.yaml) for the seed's config/slurm/<name>*.yaml
SHIPPED_PLATFORMS = ("lumi", "leonardo", "juwels", "jupiter", "marenostrum")
DEFAULT_OUTPUT_ROOT = "${oc.env:OELLM_OUTPUT_DIR,/tmp/oellm-runs}"
DETECTED_PLATFORM = "${platform_detect:}"

# `#SBATCH` options with a `slurm.` key of their own; any other option goes to `slurm.directives`
SLURM_OPTIONS = frozenset(schema_fields(SlurmConfig)) - {"directives", "extra_directives"}
# the ones that take a count (`--gpus-per-node=8`); `time` takes a number or a text
COUNT_OPTIONS = frozenset(
    name for name, f in schema_fields(SlurmConfig).items() if int in (f.type, *get_args(f.type)) and name != "time"
)
# options the provider sets from the experiment's name and log path
NAMING_OPTIONS = {
    "job_name": "not needed: the job name is the experiment name; the job id is in the log file name and in XCom",
    "output": "not needed: the log of each submission is <output>/logs/<name>-<jobid>.out",
    "error": "not needed: the log of each submission is <output>/logs/<name>-<jobid>.out",
    "comment": "not needed: the job comment carries the experiment's identity (exactly-once submission)",
}
# variables the launch sets for every task (the sbatch template and the srun/torchrun launcher)
LAUNCH_VARIABLES = frozenset({"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"})
# seed placeholders of monitored paths and what they are here
PATH_PLACEHOLDERS = {
    "output_dir": "${experiment.output_dir}",
    "name": "${experiment.name}",
    "index": "${experiment.index}",
    "checkpoint_dir": "${experiment.checkpoint_dir}",
}
# the seed tool's config paths that have another path here
SEED_PATH_PREFIXES = (("backend.megatron.", "backend.args."), ("slurm.env.", "platform.env."))
# resolvers our configs know; a seed config may use others (`oc.muli`, `oc.mapcondtmpl`, ...)
OUR_RESOLVERS = frozenset({*RESOLVERS, "oc.env"})
# benchmark names of the seed's scripts that are no lm-evaluation-harness task, and the tasks they are
BENCHMARK_TASKS = {"arc": ["arc_easy", "arc_challenge"]}
# suite names by when a suite runs (the seed guide's tiers)
SUITE_NAMES = {"every": "quick", "interval": "full", "final": "benchmark"}
# a Megatron checkpoint line, to tell a seed checkpoint event from any other
CHECKPOINT_LINE = "successfully saved checkpoint from iteration    1000 to /run/checkpoints"
# flags of the seed's conversion and evaluation scripts that name what is set per checkpoint here
PER_CHECKPOINT_FLAGS = frozenset(
    {"--megatron-checkpoint", "--checkpoint", "--checkpoint-dir", "--hf-dir", "--output-dir", "--output"}
    | {"--output-file", "--iteration"}
)
TASK_FLAGS = ("--tasks", "--benchmarks", "--task")
CONVERSION_FLAGS = {"--model-type": "model_type", "--dtype": "dtype", "--max-shard-size": "max_shard_size"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_INTERPOLATION = re.compile(r"(?<!\\)\$\{([^${}]*)\}")
_ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^${}]*))?\}")
_SIBLING_INTERPOLATION = re.compile(r"\$\{\.([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
_MASK = re.compile("\ue000(\\d+)\ue001")
_MODULO = re.compile(r"%\s*(\d+)\s*==\s*0")
_TRAIN_ITERS = re.compile(r"^\{backend\.(?:args|megatron)\.train_iters\}$")
_SWEEP_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*")  # as sweep.py accepts
_TEMPLATE_FIELD = re.compile(r"\{([^{}:!]+)((?:[:!][^{}]*)?)\}")


@dataclass(frozen=True)
class Note:
    """A seed key that the sweep does not carry as it was, and why."""

    file: str
    line: int | None
    key: str
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return _one_line(f"{where}: {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}")


def _one_line(text: str) -> str:
    """Text for one line of stderr or of a YAML comment: line breaks (in a quoted seed value) escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@dataclass(frozen=True)
class SeedKey:
    """Where a value was written in a seed file: the file and the dotted key path."""

    file: str
    key: str = ""

    def child(self, part: str | int) -> SeedKey:
        return SeedKey(self.file, join_key(self.key, part))

    @property
    def place(self) -> str:
        line = key_line(self.file, self.key)
        return self.file if line is None else f"{self.file}:{line}"


class _NotTranslated(Exception):
    """A seed value with no counterpart here; the key's dispatcher turns it into a note."""

    def __init__(self, where: SeedKey, reason: str):
        super().__init__(reason)
        self.where = where
        self.reason = reason


@dataclass
class Migration:
    """The sweep (plain data, our format), the notes, and the seed files it came from."""

    config: dict[str, Any]
    notes: list[Note]
    files: list[str]

    def text(self) -> str:
        lines = ["# Migrated from the seed tool (oellm-autoexp) by `airflow-oellm migrate` from:"]
        lines += [f"#   {_one_line(file)}" for file in self.files]
        if self.notes:
            lines.append("# What it did not carry over as it was, and why (file:line: key: reason; also on stderr):")
            lines += [f"#   note: {note}" for note in self.notes]
        body = yaml.dump(_flow_short_entries(self.config), Dumper=_SweepDumper, sort_keys=False, width=120)
        return "\n".join(lines) + "\n" + body


@dataclass(frozen=True)
class _Known:
    """What the config groups offer, for wiring a seed axis name to a key or group."""

    config: dict[str, Any]  # every key some group option sets (values unused)
    groups: dict[str, list[str]]  # config group -> its options


@cache
def _known(roots: tuple[Path, ...]) -> _Known:
    composer = Composer(roots)
    merged: dict[str, Any] = {}
    for group in composer.groups():
        for option in composer.options(group):
            try:
                data = composer.compose(None, {"defaults": [{group: option}]}).data
            except ConfigError:
                continue  # an option that composes only on its cluster (`auto`): the others hold its keys
            deep_merge(merged, data, "", {})
    return _Known(merged, {group: composer.options(group) for group in composer.groups()})


@dataclass(frozen=True)
class _Schedule:
    """Which checkpoints a seed action ran on: every one, every `iterations`, the final one, or `at` one."""

    when: str  # every | interval | final | at
    iterations: int | None = None


EVERY = _Schedule("every")


@dataclass(frozen=True)
class _Axis:
    seed_name: str
    key: str  # our sweep key: a config key or a config group
    values: list[Any]
    where: SeedKey


@dataclass(frozen=True)
class _EventContext:
    """The log event an action hangs on."""

    name: str
    checkpoint: bool  # it matches Megatron's checkpoint line: actions on it are checkpoint branches
    metadata: Mapping[str, Any]


@dataclass
class Translation:
    """The sweep being built, with the notes and what is assembled once every file is read."""

    known: _Known
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    origins: dict[tuple[str, ...], SeedKey] = field(default_factory=dict)
    platforms: list[tuple[str, SeedKey]] = field(default_factory=list)
    axes: dict[str, _Axis] = field(default_factory=dict)
    base_values: dict[str, tuple[Any, SeedKey]] = field(default_factory=dict)
    name_template: tuple[str, SeedKey] | None = None
    sweep_where: SeedKey | None = None  # the seed's `axes`, where notes about the whole sweep point
    suites: list[tuple[dict[str, Any], SeedKey]] = field(default_factory=list)
    cooldowns: list[tuple[dict[str, Any], SeedKey]] = field(default_factory=list)
    log_events: dict[str, tuple[dict[str, Any], SeedKey]] = field(default_factory=dict)
    max_attempts: list[tuple[int, SeedKey]] = field(default_factory=list)
    evaluates_conversions: bool = False  # a note said once that evaluations read HF conversions

    def note(self, where: SeedKey, reason: str) -> None:
        self.notes.append(Note(where.file, key_line(where.file, where.key), where.key, reason))

    def put(self, path: tuple[str, ...], value: Any, where: SeedKey) -> bool:
        """Set a key of the sweep, or note why the value cannot be one."""
        value, problem = _checked(path, value)
        if problem is not None:
            self.note(where, problem)
            return False
        node = self.config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        previous = self.origins.get(path)
        if previous is not None and node.get(path[-1]) != value:
            self.note(where, f"changed: replaces {shown(node.get(path[-1]))} set at {previous.place}")
        node[path[-1]] = value
        self.origins[path] = where
        return True


Handler = Callable[[Translation, Any, SeedKey], None]


# --- values -------------------------------------------------------------------------------------------


def _is_plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _checked(path: tuple[str, ...], value: Any) -> tuple[Any, str | None]:
    """The value with its interpolations in our terms, and the note's reason when it cannot be set at `path`."""
    if not _is_plain(value):
        return value, f"not translated: {shown(value)} is not plain YAML data"
    value, foreign = _our_interpolations(value)
    if foreign is not None:
        return value, f"not translated: {foreign} refers to the seed tool's config layout, which has no such key here"
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    validator = Validator(partial=True)
    validator.check(nested, RootConfig)
    if validator.issues:
        issue = validator.issues[0]
        return value, f"not translated: {issue.key}: {issue.message}"
    return value, None


def _our_key(seed_key: str) -> str:
    """A seed config path as ours: `backend.megatron.lr` -> `backend.args.lr`, `slurm.sbatch.qos` -> `slurm.qos`."""
    for seed_prefix, ours in SEED_PATH_PREFIXES:
        if seed_key.startswith(seed_prefix):
            return ours + seed_key[len(seed_prefix) :]
    if seed_key.startswith("slurm.sbatch."):
        option = seed_key.removeprefix("slurm.sbatch.")
        return f"slurm.{option}" if option in SLURM_OPTIONS else f"slurm.directives.{option}"
    if seed_key == "slurm.srun.gpus_per_node":
        return "slurm.gpus_per_node"
    if seed_key.startswith("slurm.srun."):
        option = seed_key.removeprefix("slurm.srun.")
        return "srun.cpu_bind" if option == "cpu_bind" else f"srun.args.{option}"
    return seed_key


def _settable(key: str) -> bool:
    """Whether a dotted key names one value a sweep may set: a schema field, or one entry of a free mapping."""
    parts = key.split(".")
    if parts[0] in PROTECTED_SECTIONS | {"sweep"}:
        return False
    node: Any = RootConfig
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in schema_fields(node):
            return False
        node = schema_fields(node)[part].type
        if get_origin(node) is dict:  # backend.args, platform.env, vars, ...: any name below, one level deep
            return len(parts) - i - 1 == 1 or (part == "vars" and len(parts) - i - 1 >= 1)
    return not dataclasses.is_dataclass(node)


def _our_interpolation(body: str) -> str | None:
    """A seed interpolation's body as ours, or None: a resolver we lack, a relative or unknown key."""
    resolver = re.match(r"\s*([A-Za-z_][\w.]*)\s*:", body)
    if resolver:
        return body if resolver.group(1) in OUR_RESOLVERS else None
    path = body.strip()
    if not path or path.startswith("."):
        return None
    ours = _our_key(path)
    return ours if _settable(ours) or re.fullmatch(r"experiment\.\w+", ours) else None


def _our_interpolations(value: Any) -> tuple[Any, str | None]:
    """`${backend.megatron.lr}` -> `${backend.args.lr}` in every string; the first one with no counterpart."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], foreign = _our_interpolations(v)
            if foreign:
                return value, foreign
        return out, None
    if isinstance(value, list):
        items = []
        for v in value:
            item, foreign = _our_interpolations(v)
            if foreign:
                return value, foreign
            items.append(item)
        return items, None
    if not isinstance(value, str) or "${" not in value:
        return value, None
    masked: list[str] = []
    pending = value
    # innermost first: each one checked is masked, so the one around it matches next
    while match := _INTERPOLATION.search(pending):
        ours = _our_interpolation(match.group(1))
        if ours is None:
            return value, _MASK.sub(lambda m: masked[int(m.group(1))], match.group(0))
        masked.append("${" + ours + "}")
        pending = f"{pending[: match.start()]}\ue000{len(masked) - 1}\ue001{pending[match.end() :]}"
    while _MASK.search(pending):
        pending = _MASK.sub(lambda m: masked[int(m.group(1))], pending)
    return pending, None


def _mapping(value: Any, where: SeedKey) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _NotTranslated(where, f"not translated: expected a mapping, got {shown(value)}")
    return value


def _list(value: Any, where: SeedKey) -> list[Any]:
    if not isinstance(value, list):
        raise _NotTranslated(where, f"not translated: expected a list, got {shown(value)}")
    return value


def _is_unset(value: Any) -> bool:
    # a seed key left null or empty (`termination_string: null`, `output_paths: []`) carries nothing to translate
    return value is None or (isinstance(value, str | list | dict) and not value)


# --- reading a seed file ------------------------------------------------------------------------------


def _translate_mapping(t: Translation, data: Mapping[str, Any], table: Mapping[str, Handler], where: SeedKey) -> None:
    """Each key of a seed mapping through its handler; a key the table lacks becomes a note."""
    for key, value in data.items():
        at = where.child(key)
        if _is_unset(value):
            continue
        handler = table.get(key)
        try:
            if handler is None:
                raise _NotTranslated(at, "not translated: the seed tool's key has no counterpart here")
            handler(t, value, at)
        except _NotTranslated as exc:
            t.note(exc.where, exc.reason)


def _set(*path: str) -> Handler:
    def handler(t: Translation, value: Any, where: SeedKey) -> None:
        t.put(path, value, where)

    return handler


def _skip(reason: str) -> Handler:
    def handler(t: Translation, value: Any, where: SeedKey) -> None:
        t.note(where, reason)

    return handler


def _class_name(*accepted: str) -> Handler:
    def handler(t: Translation, value: Any, where: SeedKey) -> None:
        if value not in accepted:
            t.note(where, f"not translated: unknown seed class {shown(value)}; the file was read as {accepted[0]}")

    return handler


def _group_defaults(base: str, reason: str) -> Handler:
    """`defaults:` of a seed group file (`- base`, `- megatron_production`): bases are seed files of their own,
    except the group's `base`, whose counterpart is always composed here (`reason`)."""

    def handler(t: Translation, value: Any, where: SeedKey) -> None:
        for i, entry in enumerate(_list(value, where)):
            at = where.child(i)
            if entry == "_self_":
                continue
            if entry == base:
                t.note(at, reason)
            else:
                t.note(at, f"not translated: the seed base config {shown(entry)} is not read; give its file to migrate")

    return handler


# --- sweep and project ----------------------------------------------------------------------------------


def _wire(known: _Known, seed_name: str, values: list[Any]) -> tuple[KeySuggestion, bool] | None:
    """(our sweep key or group, whether that was guessed) for a seed axis name, or None: it reaches nothing."""
    ours = _our_key(seed_name)
    if ours in known.groups:
        return KeySuggestion(ours, group=True), False
    if "." in ours and _SWEEP_KEY.fullmatch(ours) and _settable(ours):
        return KeySuggestion(ours, group=False), False
    found = suggested_key(seed_name, values, known.config, known.groups)
    return (found, True) if found is not None and (found.group or _settable(found.key)) else None


def _sweep_key(t: Translation, seed_name: str, values: list[Any], where: SeedKey) -> tuple[str, list[Any]] | None:
    """Our sweep key and values for a seed axis (or base value), or None, noted: it would reach no job."""
    wired = _wire(t.known, seed_name, values)
    if wired is None:
        t.note(
            where,
            "not translated: no config key or group matches this name, and a bare name would reach no job; "
            "sweep the key it sets (`backend.args.<flag>`) or a config group",
        )
        return None
    target, guessed = wired
    if target.group:
        options = t.known.groups[target.key]
        values = [str(v) for v in values]
        unknown = [v for v in values if v not in options]
        if unknown:
            t.note(where, f"not translated: {unknown[0]} is no option of the config group {target.key}: {options}")
            return None
    else:
        checked = []
        for value in values:
            value, problem = _checked(tuple(target.key.split(".")), value)
            if problem is not None:
                t.note(where, problem)
                return None
            checked.append(value)
        values = checked
    if guessed:
        what = "the config group" if target.group else "the key"
        t.note(where, f"assumed: means {what} `{target.key}` (a bare name would reach no job)")
    return target.key, values


def _sweep_axes(t: Translation, value: Any, where: SeedKey) -> None:
    t.sweep_where = where
    for seed_name, values in flatten_mapping(_mapping(value, where)):
        at = where.child(seed_name)
        if not isinstance(values, list) or not values:
            t.note(at, f"not translated: axis values must be a non-empty list, got {shown(values)}")
            continue
        wired = _sweep_key(t, seed_name, values, at)
        if wired is not None:
            key, values = wired
            if key in t.axes:
                t.note(at, f"changed: replaces the axis set at {t.axes[key].where.place}")
            t.axes[key] = _Axis(seed_name, key, values, at)


def _sweep_base_values(t: Translation, value: Any, where: SeedKey) -> None:
    for seed_name, item in flatten_mapping(_mapping(value, where)):
        at = where.child(seed_name)
        wired = _sweep_key(t, seed_name, [item], at)
        if wired is not None:
            key, (item,) = wired
            t.base_values[key] = (item, at)


def _sweep_name_template(t: Translation, value: Any, where: SeedKey) -> None:
    if not isinstance(value, str):
        raise _NotTranslated(where, f"not translated: expected a string, got {shown(value)}")
    t.name_template = (value, where)


def _project_resume(t: Translation, value: Any, where: SeedKey) -> None:
    if value is True:
        t.note(where, "not needed: a resubmitted job always resumes from the latest checkpoint of its directory")
    else:
        t.note(where, "not translated: resuming cannot be turned off: a resubmitted job loads its latest checkpoint")


SWEEP_KEYS: dict[str, Handler] = {
    "class_name": _class_name("Sweep"),
    "axes": _sweep_axes,
    "base_values": _sweep_base_values,
    "name_template": _sweep_name_template,
    "store_sweep_json": _skip(
        "not needed: `airflow-oellm plan SWEEP --json` lists the experiments; each run keeps <output>/provenance"
    ),
}

PROJECT_KEYS: dict[str, Handler] = {
    "class_name": _class_name("Project"),
    "name": _set("project", "name"),
    "base_output_dir": _set("project", "base_output_dir"),
    "description": _set("project", "description"),
    "monitoring_state_dir": _skip("not needed: state is kept by Airflow and <output>/.oellm/"),
    "state_dir": _skip("not needed: state is kept by Airflow and <output>/.oellm/"),
    "resume": _project_resume,
}


# --- slurm ------------------------------------------------------------------------------------------------


def _sbatch_option(t: Translation, name: str, value: Any, where: SeedKey) -> None:
    option = name.replace("-", "_")
    if option in NAMING_OPTIONS:
        t.note(where, NAMING_OPTIONS[option])
        return
    if isinstance(value, str) and "${" not in value:
        try:
            directive_value(option, value)
            if option == "time":
                time_limit_seconds(value)
        except (ShellSafetyError, ValueError) as exc:
            raise _NotTranslated(where, f"not translated: {exc}") from None
    if option == "time" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # sbatch read a bare number as minutes; a number here is seconds
    if option == "exclude" and isinstance(value, str):
        value = [node for node in value.split(",") if node]
    if option in SLURM_OPTIONS:
        t.put(("slurm", option), value, where)
    else:
        t.put(("slurm", "directives", option), value, where)


def _sbatch(t: Translation, value: Any, where: SeedKey) -> None:
    for name, item in _mapping(value, where).items():
        if not _is_unset(item):
            _sbatch_option(t, str(name), item, where.child(name))


def _extra_directives(t: Translation, value: Any, where: SeedKey) -> None:
    """Directive lines; one with a `slurm.` key of its own sets that key (GPU-hours and the launch read it)."""
    lines = []
    for i, line in enumerate(_list(value, where)):
        at = where.child(i)
        try:
            name, option_value = parse_extra_directive(line)
        except ShellSafetyError as exc:
            t.note(at, f"not translated: {exc}")
            continue
        option = name.replace("-", "_")
        if option in SLURM_OPTIONS:
            is_count = option in COUNT_OPTIONS and isinstance(option_value, str) and option_value.isdecimal()
            t.put(("slurm", option), int(option_value) if is_count else option_value, at)
        elif option in NAMING_OPTIONS:
            t.note(at, NAMING_OPTIONS[option])
        else:
            lines.append(line.strip())
    if lines:
        t.put(("slurm", "extra_directives"), lines, where)


def _env_value(value: Any, siblings: Mapping[str, Any], where: SeedKey) -> tuple[Any, list[str]]:
    """A seed env value for the job script: `${oc.env:X}` becomes the job's `${X}`; `${.Y}` the sibling's value."""
    if not isinstance(value, str):
        return value, []
    if "$(" in value or "`" in value:
        raise _NotTranslated(
            where, "not translated: command substitution is inert here (platform.env values are quoted)"
        )
    for _ in range(len(siblings) + 1):  # a chain of siblings, never a cycle
        match = _SIBLING_INTERPOLATION.search(value)
        if match is None:
            break
        sibling = siblings.get(match.group(1))
        if not isinstance(sibling, str | int | float) or isinstance(sibling, bool):
            break
        value = value[: match.start()] + str(sibling) + value[match.end() :]
    converted = [m.group(1) for m in _ENV_INTERPOLATION.finditer(value)]

    def job_reference(m: re.Match[str]) -> str:
        default = m.group(2)
        return f"\\${{{m.group(1)}:-{default}}}" if default else f"\\${{{m.group(1)}}}"

    return _ENV_INTERPOLATION.sub(job_reference, value), converted


def _env(t: Translation, value: Any, where: SeedKey) -> None:
    env = _mapping(value, where)
    for name, item in env.items():
        at = where.child(name)
        if name in LAUNCH_VARIABLES:
            t.note(at, "not needed: the launch sets MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE")
            continue
        try:
            check_env_name(name)
            item, converted = _env_value(item, env, at)
        except ShellSafetyError as exc:
            t.note(at, f"not translated: {exc}")
            continue
        except _NotTranslated as exc:
            t.note(exc.where, exc.reason)
            continue
        if t.put(("platform", "env", name), item, at) and converted:
            variables = ", ".join(f"${variable}" for variable in converted)
            t.note(
                at,
                f"changed: {variables} now expand in the job's environment when it starts "
                "(the seed tool read ${oc.env:...} where it loaded the config)",
            )


def _srun(t: Translation, value: Any, where: SeedKey) -> None:
    for name, item in _mapping(value, where).items():
        at = where.child(name)
        if _is_unset(item):
            continue
        key = _our_key(f"slurm.srun.{name}")
        t.put(tuple(key.split(".")), item, at)


PLATFORM_BASE = "not needed: every platform here extends platform/base.yaml (the seed's base)"
LOG_PATHS_FIXED = "not needed: paths are fixed: <output>/scripts/<name>-try<N>.sbatch, <output>/logs/<name>-<jobid>.out"
SLURM_COMMANDS = "not needed: the provider's SLURM hook runs sbatch, squeue, sacct and scancel (over SSH)"
SLURM_KEYS: dict[str, Handler] = {
    "class_name": _class_name("Slurm"),
    "defaults": _group_defaults("base", PLATFORM_BASE),
    "sbatch": _sbatch,
    "sbatch_overrides": _sbatch,  # more #SBATCH options
    "sbatch_extra_directives": _extra_directives,
    "env": _env,
    "srun": _srun,
    "script_dir": _skip(LOG_PATHS_FIXED),
    "log_dir": _skip(LOG_PATHS_FIXED),
    "log_path": _skip(LOG_PATHS_FIXED),
    "template_path": _skip(
        "not translated: a site's sbatch template is platform.template, a Jinja file extending base.sbatch.j2"
    ),
    "launcher_cmd": _skip("not translated: the launch line is made from backend.launcher, srun and platform.container"),
    "srun_opts": _skip("not translated: the launch line is made from backend.launcher, srun and platform.container"),
    "launcher_env_passthrough": _skip("not needed: the job script exports platform.env, so every srun step has it"),
    "array": _skip("not needed: each experiment is a job of its own; Airflow runs them side by side"),
    "submit_cmd": _skip(SLURM_COMMANDS),
    "squeue_cmd": _skip(SLURM_COMMANDS),
    "cancel_cmd": _skip(SLURM_COMMANDS),
    "sacct_cmd": _skip(SLURM_COMMANDS),
    "client": _skip(SLURM_COMMANDS),
    "test_only": _skip(SLURM_COMMANDS),
}


# --- monitoring: events, actions, conditions ----------------------------------------------------------------


def _output_paths(t: Translation, value: Any, where: SeedKey) -> None:
    paths = []
    for i, path in enumerate(_list(value, where)):
        at = where.child(i)
        if isinstance(path, str):
            if any(p not in PATH_PLACEHOLDERS for p in _PLACEHOLDER.findall(path)):
                t.note(at, f"not translated: a placeholder this path would need has no counterpart here: {shown(path)}")
                continue
            path = _PLACEHOLDER.sub(lambda m: PATH_PLACEHOLDERS[m.group(1)], path)
        paths.append(path)
    if paths:
        t.put(("monitoring", "output_paths"), paths, where)


def _is_checkpoint_event(event: Mapping[str, Any]) -> bool:
    pattern = event.get("pattern")
    if not isinstance(pattern, str):
        return False
    if event.get("pattern_type", "regex") == "substring":
        return pattern in CHECKPOINT_LINE
    try:
        return re.search(pattern, CHECKPOINT_LINE) is not None
    except re.error:
        return False


def _event_problem(spec: Mapping[str, Any]) -> str | None:
    """The note's reason when a log event cannot be one of ours (schema, regex, groups), or None."""
    _, problem = _checked(("monitoring", "log_events"), [spec])
    if problem is not None or spec.get("pattern_type", "regex") != "regex":
        return problem
    try:
        groups = re.compile(spec["pattern"]).groupindex
    except re.error as exc:
        return f"not translated: invalid regex: {exc}"
    missing = [g for g in (spec.get("extract_groups") or {}).values() if g not in groups]
    return f"not translated: the pattern has no group named {shown(missing[0])}" if missing else None


EVENT_FIELDS = ("name", "pattern", "pattern_type", "extract_groups", "metadata")
BUILTIN_PATTERNS = {name: pattern for name, pattern, _ in BUILTIN_EVENTS}


def _log_events(t: Translation, value: Any, where: SeedKey) -> None:
    for i, item in enumerate(_list(value, where)):
        at = where.child(i)
        try:
            _log_event(t, _mapping(item, at), at)
        except _NotTranslated as exc:
            t.note(exc.where, exc.reason)


def _log_event(t: Translation, event: dict[str, Any], where: SeedKey) -> None:
    spec = {k: event[k] for k in EVENT_FIELDS if k in event and not _is_unset(event[k])}
    for key in event:
        if key in ("state", "action", "mode"):
            t.note(where.child(key), "not needed: the training task classifies how each job ended (docs/operators.md)")
        elif key not in (*EVENT_FIELDS, "actions"):
            t.note(where.child(key), "not translated: the seed tool's key has no counterpart here")
    name = spec.get("name")
    if {"name", "pattern"} <= set(spec):
        problem = _event_problem(spec)
    else:
        problem = "not translated: a log event needs a name and a pattern"
    if problem is not None:
        t.note(where, problem)
    elif BUILTIN_PATTERNS.get(str(name)) == spec["pattern"] or (
        name == "checkpoint_saved"
        and _is_checkpoint_event(spec)
        and _is_checkpoint_event({"pattern": BUILTIN_PATTERNS[name]})
    ):
        # the built-in checkpoint event knows every Megatron wording: a seed one of that name would replace it
        t.note(where, f"not needed: the built-in event {name} matches the same lines (checkpoint branches need none)")
    else:
        if name in t.log_events:
            t.note(where, f"changed: replaces the event set at {t.log_events[name][1].place}")
        t.log_events[name] = (spec, where)
    metadata = event.get("metadata")
    context = _EventContext(str(name), _is_checkpoint_event(event), metadata if isinstance(metadata, dict) else {})
    actions = event.get("actions")
    if _is_unset(actions):
        return
    for i, action in enumerate(_list(actions, where.child("actions"))):
        at = where.child("actions").child(i)
        try:
            _action(t, _mapping(action, at), at, context, EVERY)
        except _NotTranslated as exc:
            t.note(exc.where, exc.reason)


def _action(t: Translation, action: dict[str, Any], where: SeedKey, event: _EventContext, when: _Schedule) -> None:
    kind = action.get("class_name")
    handler = ACTIONS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        raise _NotTranslated(where, f"not translated: no counterpart here for the seed action {shown(kind)}")
    handler(t, action, where, event, when)


def _log_action(t: Translation, action: dict[str, Any], where: SeedKey, event: _EventContext, when: _Schedule) -> None:
    t.note(where, "not needed: the task logs show every event (LogAction); a SlurmLogSensor can wait for one")


def _event_action(
    t: Translation, action: dict[str, Any], where: SeedKey, event: _EventContext, when: _Schedule
) -> None:
    for key in action:
        if key not in ("class_name", "mode", "conditions", "action"):
            t.note(where.child(key), "not translated: the seed tool's key has no counterpart here")
    conditions = action.get("conditions")
    schedule = when
    for i, condition in enumerate([] if _is_unset(conditions) else _list(conditions, where.child("conditions"))):
        at = where.child("conditions").child(i)
        found = _condition(t, _mapping(condition, at), at, event)
        if found is not None:
            if schedule != EVERY and found != schedule:
                raise _NotTranslated(at, "not translated: two conditions pick different checkpoints")
            schedule = found
    inner = action.get("action")
    if _is_unset(inner):
        raise _NotTranslated(where, "not translated: an EventAction without an action does nothing")
    _action(t, _mapping(inner, where.child("action")), where.child("action"), event, schedule)


def _condition(t: Translation, condition: dict[str, Any], where: SeedKey, event: _EventContext) -> _Schedule | None:
    """The checkpoints a condition lets through (None: all), noting conditions that are built in here."""
    kind = condition.get("class_name")
    if kind in ("FileExistsCondition", "BlockingFileExistsCondition"):
        path = str(condition.get("path", ""))
        if path.endswith("config.json"):
            t.note(where, "not needed: the evaluation task runs after the conversion task in the same branch")
        elif "checkpoint" in path:
            t.note(where, "not needed: a CheckpointSensor waits for the tracker file and a complete iter_N directory")
        else:
            raise _NotTranslated(where, "not translated: waiting for another file: a sensor in a DAG of your own")
        return None
    if kind == "CommandCondition":
        command = condition.get("command")
        text = " ".join(map(str, command)) if isinstance(command, list) else str(command)
        modulo = _MODULO.search(text)
        if "checkpoint_iteration" in text and modulo:
            return _Schedule("interval", int(modulo.group(1)))
        raise _NotTranslated(
            where, "not translated: a shell condition; only `iteration % N == 0` (when: interval) has a counterpart"
        )
    if kind == "MetadataCondition":
        return _metadata_condition(t, condition, where, event)
    raise _NotTranslated(where, f"not translated: no counterpart here for the seed condition {shown(kind)}")


def _metadata_condition(
    t: Translation, condition: dict[str, Any], where: SeedKey, event: _EventContext
) -> _Schedule | None:
    key, equals = condition.get("key"), condition.get("equals")
    if key in ("checkpoint_iteration", "iteration") and equals is not None:
        if _TRAIN_ITERS.match(str(equals)):
            return _Schedule("final")
        if str(equals).strip().isdecimal():
            return _Schedule("at", int(str(equals)))
    if isinstance(key, str) and equals is not None and event.metadata.get(key) == equals:
        t.note(where, "not needed: always true for this event (its own metadata)")
        return None
    raise _NotTranslated(where, "not translated: a condition on event metadata other than the checkpoint iteration")


def _command_words(command: Any, where: SeedKey) -> list[str]:
    if isinstance(command, list) and command:
        return [str(word) for word in command]
    if isinstance(command, str) and command.strip():
        try:
            return shlex.split(command)
        except ValueError as exc:
            raise _NotTranslated(where, f"not translated: {exc}") from None
    raise _NotTranslated(where, "not translated: no command to run")


def _flags(words: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(the program: words before the first flag, {--flag: value})."""
    program: list[str] = []
    flags: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            if not flags:
                program.append(word)
            i += 1
            continue
        name, eq, value = word.partition("=")
        if not eq and i + 1 < len(words) and not words[i + 1].startswith("--"):
            value, i = words[i + 1], i + 1
        flags[name] = value
        i += 1
    return " ".join(program), flags


def _run_command(t: Translation, action: dict[str, Any], where: SeedKey, event: _EventContext, when: _Schedule) -> None:
    for key in action:
        if key not in ("class_name", "command"):
            t.note(where.child(key), "not translated: the seed tool's key has no counterpart here")
    program, flags = _flags(_command_words(action.get("command"), where.child("command")))
    if "convert" in program:
        _require_checkpoint_event(event, where)
        _conversion(t, flags, where)
    elif re.search(r"eval|bench", program):
        _require_checkpoint_event(event, where)
        _evaluation(t, flags, where, when)
    else:
        raise _NotTranslated(
            where, "not translated: a command run on an event: a task in a DAG of your own, or evaluation.command"
        )


def _require_checkpoint_event(event: _EventContext, where: SeedKey) -> None:
    if not event.checkpoint:
        raise _NotTranslated(
            where,
            f"not translated: checkpoint branches start from checkpoints; event {event.name} is none "
            "(a SlurmLogSensor in a DAG of your own can wait for it)",
        )


def _conversion(t: Translation, flags: Mapping[str, str], where: SeedKey) -> None:
    t.note(
        where,
        "changed: `airflow-oellm convert` (conversion.command) replaces the seed's conversion script; checkpoint, "
        "iteration and output directory (<output>/hf/iter_NNNNNNN) are set per checkpoint",
    )
    for flag, value in flags.items():
        at = where.child("command")
        if flag in CONVERSION_FLAGS:
            t.put(("conversion", CONVERSION_FLAGS[flag]), DTYPES.get(value, value), at)
        elif flag not in PER_CHECKPOINT_FLAGS:
            t.note(at, f"not translated: {flag} has no counterpart in `airflow-oellm convert`")


def _evaluation(t: Translation, flags: Mapping[str, str], where: SeedKey, when: _Schedule) -> None:
    if when.when == "at":
        raise _NotTranslated(
            where,
            "not translated: an evaluation of one iteration only; suites run on every checkpoint, every N iterations "
            "or the final one (a cooldown `{at: N, train: false}` evaluates one more)",
        )
    given = next((flags[f] for f in TASK_FLAGS if f in flags), "")
    tasks: list[str] = []
    for task in (name.strip() for name in given.split(",")):
        if task in BENCHMARK_TASKS:
            t.note(
                where.child("command"),
                f"changed: {task} is no lm-evaluation-harness task; written as {', '.join(BENCHMARK_TASKS[task])}",
            )
        tasks += BENCHMARK_TASKS.get(task, [task] if task else [])
    if not tasks:
        tasks = ["perplexity"]
        t.note(where, "assumed: tasks [perplexity] (the seed's evaluation named none); add lm-eval task names")
    schedule: dict[str, Any] = {"when": when.when}
    if when.iterations is not None:
        schedule["every_iterations"] = when.iterations
    same = next((suite for suite, _ in t.suites if suite == {"name": suite["name"], **schedule, "tasks": tasks}), None)
    if same is not None:
        t.note(where, f"not needed: suite {same['name']} runs the same tasks on the same checkpoints")
    else:
        taken = {suite["name"] for suite, _ in t.suites}
        base = SUITE_NAMES[when.when]
        name = next(n for n in (base, *(f"{base}_{i}" for i in range(2, len(taken) + 3))) if n not in taken)
        t.suites.append(({"name": name, **schedule, "tasks": tasks}, where))
    for flag in flags:
        if flag not in PER_CHECKPOINT_FLAGS and flag not in TASK_FLAGS:
            t.note(where.child("command"), f"not translated: {flag} has no counterpart in `airflow-oellm evaluate`")
    if not t.evaluates_conversions:
        t.evaluates_conversions = True
        t.note(
            where,
            "changed: `airflow-oellm evaluate` (evaluation.command) evaluates the HuggingFace conversion of each "
            "checkpoint; results in <output>/evaluations/iter_NNNNNNN/<suite>.json",
        )


def _run_autoexp(t: Translation, action: dict[str, Any], where: SeedKey, event: _EventContext, when: _Schedule) -> None:
    for key in action:
        if key not in ("class_name", "script", "config_path", "overrides"):
            t.note(where.child(key), "not translated: the seed tool's key has no counterpart here")
    overrides = action.get("overrides")
    texts = [] if _is_unset(overrides) else [str(o) for o in _list(overrides, where.child("overrides"))]
    backend = next((o.partition("=")[2] for o in texts if o.lstrip("+").startswith("backend=")), "")
    _require_checkpoint_event(event, where)
    if "eval" in backend:
        _evaluation(t, {}, where, when)
        if len(texts) > 1:
            t.note(
                where.child("overrides"),
                "not needed: an evaluation job gets its checkpoint, iteration and HF directory per checkpoint",
            )
    elif when.when == "at" and when.iterations is not None:
        _cooldown(t, texts, where.child("overrides"), when.iterations)
    else:
        raise _NotTranslated(
            where,
            "not translated: a follow-up run on more than one checkpoint; a cooldown starts from one (cooldowns[].at)",
        )


ACTIONS: dict[str, Callable[[Translation, dict[str, Any], SeedKey, _EventContext, _Schedule], None]] = {
    "LogAction": _log_action,
    "EventAction": _event_action,
    "RunCommandAction": _run_command,
    "RunAutoexpAction": _run_autoexp,
}


# --- cooldowns ------------------------------------------------------------------------------------------


COOLDOWN_OVERRIDES = {
    "backend.args.load": "not needed: a cooldown loads the parent's checkpoint (--load, --ckpt-step N)",
    "backend.args.save": "not needed: a cooldown saves to <output>_cooldown_<N>/checkpoints",
    "project.name": "not needed: a cooldown gets W&B and TensorBoard names of its own",
    "monitoring": "not needed: a cooldown never has cooldowns of its own",
    "monitor": "not needed: a cooldown never has cooldowns of its own",
}


def _cooldown(t: Translation, overrides: list[str], where: SeedKey, at: int) -> None:
    """A follow-up run from checkpoint `at`: the parent's config plus the overrides that train differently."""
    cooldown: dict[str, Any] = {"at": at}
    kept: list[str] = []
    train = True
    for i, text in enumerate(overrides):
        item = where.child(i)
        seed_key, _, raw = text.lstrip("+~").partition("=")
        key = _our_key(seed_key.strip())
        raw = raw.strip()
        if key in COOLDOWN_OVERRIDES:
            t.note(item, COOLDOWN_OVERRIDES[key])
        elif key == "project.base_output_dir":
            if "timestring" in raw:
                cooldown["name"] = f"cooldown_{at}_$${{oc.timestring:}}"
            else:
                t.note(item, "not needed: a cooldown writes to <output>_cooldown_<N>")
        elif key in ("backend.args.eval_only", "backend.args.skip_train") or (
            key == "backend.args.train_iters" and raw == "0"
        ):
            train = False
        elif _PLACEHOLDER.search(raw):
            t.note(item, "not translated: a seed placeholder ({...}) in an override has no counterpart here")
        elif _settable(key):
            kept.append(f"{key}={raw}")
        else:
            t.note(item, "not translated: this override names no config key here")
    if train:
        cooldown["overrides"] = kept
    else:
        cooldown["train"] = False
        if kept:
            t.note(where, "not needed: an evaluation-only cooldown (train: false) trains nothing to override")
    t.cooldowns.append((cooldown, where))


# --- state events and restarts ----------------------------------------------------------------------------


def _state_events(t: Translation, value: Any, where: SeedKey) -> None:
    for i, item in enumerate(_list(value, where)):
        at = where.child(i)
        try:
            event = _mapping(item, at)
            for key in event:
                if key == "state":
                    t.note(at.child(key), "not needed: the training task recognises how each job ended itself")
                elif key not in ("name", "actions"):
                    t.note(at.child(key), "not translated: the seed tool's key has no counterpart here")
            actions = event.get("actions")
            for j, action in enumerate([] if _is_unset(actions) else _list(actions, at.child("actions"))):
                try:
                    _restart_action(t, _mapping(action, at.child("actions").child(j)), at.child("actions").child(j))
                except _NotTranslated as exc:
                    t.note(exc.where, exc.reason)
        except _NotTranslated as exc:
            t.note(exc.where, exc.reason)


def _restart_action(t: Translation, action: dict[str, Any], where: SeedKey) -> None:
    """`EventAction` with conditions and a `RestartAction`: how often a failed job is resubmitted."""
    inner = action.get("action") if action.get("class_name") == "EventAction" else None
    if not isinstance(inner, dict) or inner.get("class_name") != "RestartAction":
        raise _NotTranslated(
            where, "not translated: on a job's end only restarts have a counterpart (restart:, docs/operators.md)"
        )
    conditions = action.get("conditions")
    limited = False
    for i, condition in enumerate([] if _is_unset(conditions) else _list(conditions, where.child("conditions"))):
        at = where.child("conditions").child(i)
        condition = _mapping(condition, at)
        kind = condition.get("class_name")
        attempts = condition.get("max_attempts")
        if kind == "MaxAttemptsCondition" and type(attempts) is int and attempts >= 1:
            t.max_attempts.append((attempts, at))
            limited = True
        elif kind == "MetadataCondition" and condition.get("key") == "error_type" and condition.get("not_equals"):
            t.note(at, "not needed: out-of-memory and other fatal failures are never retried (docs/operators.md)")
        else:
            t.note(at, "not translated: retries follow the training task's classification, not conditions")
    if not limited:
        t.note(where, "assumed: restart.max_attempts keeps its default (the seed restarted without a limit)")
    if not _is_unset(inner.get("reason")):
        t.note(where.child("action").child("reason"), "not needed: the task log gives the reason of each retry")


MONITORING_KEYS: dict[str, Handler] = {
    "class_name": _class_name("SlurmLogMonitor"),
    "defaults": _group_defaults(
        "default", "not needed: monitoring/default.yaml is composed into every sweep (the seed's default)"
    ),
    "poll_interval_seconds": _set("monitoring", "poll_interval_seconds"),
    "inactivity_threshold_seconds": _set("monitoring", "inactivity_threshold_seconds"),
    "check_interval_seconds": _skip("not needed: one interval here, monitoring.poll_interval_seconds"),
    "output_paths": _output_paths,
    "log_events": _log_events,
    "log_signals": _log_events,
    "state_events": _state_events,
    "log_path": _skip(LOG_PATHS_FIXED),
    "log_path_template": _skip(LOG_PATHS_FIXED),
    "termination_string": _skip("not translated: ending a job on a log line: a SlurmLogSensor in a DAG of your own"),
    "termination_command": _skip("not translated: ending a job on a log line: a SlurmLogSensor in a DAG of your own"),
    "start_condition_cmd": _skip("not translated: a run starts when its DAG is triggered or scheduled (dag.schedule)"),
    "start_condition_interval_seconds": _skip(
        "not translated: a run starts when its DAG is triggered or scheduled (dag.schedule)"
    ),
    "metadata": _skip("not needed: descriptive metadata of the seed monitor"),
}


# --- root configs and platform selection -----------------------------------------------------------------


def _root_defaults(t: Translation, value: Any, where: SeedKey) -> None:
    """`defaults:` of a seed root config: `slurm: <site>` picks our platform; other groups are seed files."""
    for i, entry in enumerate(_list(value, where)):
        at = where.child(i)
        if entry == "_self_":
            continue
        group, option = next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1 else ("", entry)
        if group == "slurm" and (option == DETECTED_PLATFORM or option in SHIPPED_PLATFORMS):
            t.platforms.append((str(option), at))
        elif group == "slurm" and option == "base":
            t.note(at, PLATFORM_BASE)
        elif group == "container":
            t.note(at, "not needed: a platform file carries its container settings (platform.container)")
        else:
            t.note(at, f"not translated: the seed config {shown(entry)} is not read; give its file to migrate")


def _section(table: Mapping[str, Handler]) -> Handler:
    def handler(t: Translation, value: Any, where: SeedKey) -> None:
        _translate_mapping(t, _mapping(value, where), table, where)

    return handler


ROOT_KEYS: dict[str, Handler] = {
    "defaults": _root_defaults,
    "project": _section(PROJECT_KEYS),
    "sweep": _section(SWEEP_KEYS),
    "slurm": _section(SLURM_KEYS),
    "monitoring": _section(MONITORING_KEYS),
    "backend": _skip("not translated: the seed's backend config is not read; set Megatron flags under backend.args"),
    "metadata": _skip("not needed: descriptive metadata of the seed config"),
}

# how a seed file is recognised: its class_name, else the keys only its kind has
KINDS: tuple[tuple[str, Mapping[str, Handler], frozenset[str]], ...] = (
    ("Sweep", SWEEP_KEYS, frozenset({"axes", "base_values"})),
    (
        "SlurmLogMonitor",
        MONITORING_KEYS,
        frozenset(
            {"log_events", "state_events", "log_signals", "poll_interval_seconds", "inactivity_threshold_seconds"}
        ),
    ),
    ("Slurm", SLURM_KEYS, frozenset({"sbatch", "sbatch_extra_directives", "sbatch_overrides", "srun", "env"})),
    ("Project", PROJECT_KEYS, frozenset({"base_output_dir", "monitoring_state_dir"})),
    ("", ROOT_KEYS, frozenset({"defaults", "project", "sweep", "slurm", "monitoring"})),
)


def _kind(data: Mapping[str, Any]) -> tuple[str, Mapping[str, Handler]] | None:
    class_name = data.get("class_name")
    for name, table, _keys in KINDS:
        if name and class_name == name:
            return name, table
    for name, table, keys in KINDS:
        if keys & set(data):
            return name or "root", table
    return None


# --- assembling the sweep -----------------------------------------------------------------------------------


def _finish(t: Translation, files: list[str], name: str | None, output_dir: str | None, stem: str) -> None:
    _finish_project(t, files, name, output_dir, stem)
    _finish_platform(t)
    _finish_lists(t)
    _finish_sweep(t, files)


def _finish_project(t: Translation, files: list[str], name: str | None, output_dir: str | None, stem: str) -> None:
    where = SeedKey(files[0])
    project = t.config.setdefault("project", {})
    for key, given in (("name", name), ("base_output_dir", output_dir)):
        if given is not None:
            if key in project:
                t.note(t.origins[("project", key)], f"changed: the command line's value {shown(given)} is used")
            project[key] = given
    if "name" not in project:
        project["name"] = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem).lstrip("_.-") or "migrated"
        t.note(where, f"assumed: project.name {project['name']} (no seed project file; --name sets it)")
    if "base_output_dir" not in project:
        project["base_output_dir"] = f"{DEFAULT_OUTPUT_ROOT}/{project['name']}"
        t.note(
            where, f"assumed: project.base_output_dir {project['base_output_dir']} (no seed project file; --output-dir)"
        )


def _finish_platform(t: Translation) -> None:
    explicit = [(p, w) for p, w in t.platforms if p != DETECTED_PLATFORM]
    chosen = explicit[0][0] if explicit else (DETECTED_PLATFORM if t.platforms else None)
    for platform, where in t.platforms:
        if platform != chosen:
            t.note(
                where,
                f"not translated: platform {platform} conflicts with platform {chosen}, "
                "whose settings the sweep carries",
            )
    if chosen is not None:
        t.config["defaults"] = [{"platform": chosen}, "_self_"]


def _finish_lists(t: Translation) -> None:
    if t.log_events:
        first = next(iter(t.log_events.values()))[1]
        t.put(("monitoring", "log_events"), [spec for spec, _ in t.log_events.values()], first)
    if t.max_attempts:
        most, where = max(t.max_attempts, key=lambda item: item[0])
        t.put(("restart", "max_attempts"), most, where)
        for attempts, at in t.max_attempts:
            if attempts != most:
                t.note(at, f"changed: one limit for every retryable failure here: restart.max_attempts {most}")
    if t.suites:
        t.put(("evaluation", "suites"), [suite for suite, _ in t.suites], t.suites[0][1])
    if t.cooldowns:
        cooldowns = sorted(t.cooldowns, key=lambda item: item[0]["at"])
        if t.put(("cooldowns",), [cooldown for cooldown, _ in cooldowns], cooldowns[0][1]):
            _check_cooldown_points(t, cooldowns)


def _check_cooldown_points(t: Translation, cooldowns: list[tuple[dict[str, Any], SeedKey]]) -> None:
    """A cooldown starts from a checkpoint: say so where the sweep's iterations (its base values, else the
    backend's defaults) have none there."""
    defaults = t.known.config.get("backend", {}).get("args", {})

    def iterations(flag: str) -> Any:
        key = f"backend.args.{flag}"
        return t.base_values[key][0] if key in t.base_values else defaults.get(flag)

    train_iters, save_interval = iterations("train_iters"), iterations("save_interval")
    if not all(isinstance(v, int) for v in (train_iters, save_interval)) or {"backend.args.train_iters"} & set(t.axes):
        return
    checkpoints = expected_checkpoints(train_iters, save_interval)
    for cooldown, where in cooldowns:
        if cooldown["at"] not in checkpoints:
            t.note(
                where,
                f"assumed: the training reaches a checkpoint at {cooldown['at']}: set backend.args.train_iters and "
                "save_interval (the seed passed them on its command line)",
            )


def _finish_sweep(t: Translation, files: list[str]) -> None:
    if not t.axes and not t.base_values:
        return
    sweep: dict[str, Any] = {}
    if t.axes:
        sweep["name_template"] = _name_template(t, files)
    if t.base_values:
        sweep["base_values"] = {key: value for key, (value, _) in t.base_values.items()}
    if t.axes:
        sweep["axes"] = {key: axis.values for key, axis in t.axes.items()}
    t.config["sweep"] = sweep


def _field(key: str, keys: Sequence[str]) -> str:
    """A template field for a sweep key: its last part when no other key ends alike (`{lr}`)."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in keys) == 1 else key


def _label(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    initials = "".join(part[0] for part in leaf.split("_") if part)
    return leaf if len(leaf) <= 4 or "_" not in leaf else initials


def _name_template(t: Translation, files: list[str]) -> str:
    """The seed's template in our fields; else one from the axes (`{model}_lr{lr}`), else `{project}_{index}`."""
    keys = [*t.axes, *t.base_values]
    from_axes = "_".join(
        f"{{{_field(key, keys)}}}" if key in t.known.groups else f"{_label(key)}{{{_field(key, keys)}}}"
        for key in t.axes
    )
    generated = from_axes if _names_ok(t, from_axes) else "{project}_{index}"
    if t.name_template is None:
        t.note(
            t.sweep_where or SeedKey(files[0]),
            f"assumed: sweep.name_template {generated} (the seed sweep named experiments <project>_<index>)",
        )
        return generated
    seed_template, where = t.name_template
    fields = {"project": "project", "project_name": "project", "index": "index"}
    for axis in t.axes.values():
        fields[axis.seed_name] = fields[axis.seed_name.replace(".", "___")] = _field(axis.key, keys)
    if all(name.strip() in fields for name, _ in _TEMPLATE_FIELD.findall(seed_template)):
        template = _TEMPLATE_FIELD.sub(lambda m: f"{{{fields[m.group(1).strip()]}{m.group(2)}}}", seed_template)
        if _names_ok(t, template):
            return template
    t.note(where, f"not translated: the seed template does not name every experiment here; used {generated}")
    return generated


def _names_ok(t: Translation, template: str) -> bool:
    """Whether the template gives every point of the sweep its own safe name."""
    sweep = {
        "base_values": {key: value for key, (value, _) in t.base_values.items()},
        "axes": {key: axis.values for key, axis in t.axes.items()},
    }
    project = t.config["project"]["name"]
    names = set()
    try:
        for point in expand_sweep(sweep):
            name = render_template(template, {**point.values, "index": point.index, "project": project})
            names.add(check_name(name))
    except (SweepError, NamingError):
        return False
    return len(names) == len(expand_sweep(sweep))


# --- writing ------------------------------------------------------------------------------------------------

SECTION_ORDER = (
    "defaults",
    "project",
    "platform",
    "slurm",
    "srun",
    "backend",
    "monitoring",
    "restart",
    "conversion",
    "evaluation",
    "cooldowns",
    "sweep",
)


class _Flow(dict):  # type: ignore[type-arg]
    """A mapping written on one line (`{name: quick, when: every, tasks: [perplexity]}`)."""


class _SweepDumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists of scalars and short list entries."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)  # list items indented under their key, as in our docs


def _short_flow(value: Any) -> bool:
    return len(yaml.safe_dump(value, default_flow_style=True, width=10_000)) < 100


_SweepDumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
_SweepDumper.add_representer(
    list,
    lambda d, v: d.represent_sequence(
        "tag:yaml.org,2002:seq",
        v,
        flow_style=all(not isinstance(i, dict | list) for i in v) and _short_flow(v),
    ),
)


def _flow_short_entries(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config in section order, list entries that fit on a line marked to be written on one."""

    def mark(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [_Flow(mark(v)) if isinstance(v, dict) and _short_flow(v) else mark(v) for v in value]
        return value

    ordered = {key: config[key] for key in SECTION_ORDER if key in config}
    return mark({**ordered, **{k: v for k, v in config.items() if k not in ordered}})


# --- entry point ------------------------------------------------------------------------------------------------


def migrate(
    paths: Sequence[str], *, name: str | None = None, output_dir: str | None = None, config_dirs: Sequence[str] = ()
) -> Migration:
    """Seed files -> one sweep (plain data) and notes. Raises ConfigError when an input cannot be read."""
    issues = []
    if name is not None:
        try:
            check_name(name, "project name")
        except NamingError as exc:
            issues.append(Issue(str(exc), file="--name"))
    if output_dir is not None and "${" not in output_dir:
        try:
            check_output_root(output_dir)
        except NamingError as exc:
            issues.append(Issue(str(exc), file="--output-dir"))
    files = list(dict.fromkeys(str(p) for p in paths))
    if not files:
        issues.append(Issue("no seed files given"))
    readable: list[tuple[str, dict[str, Any], tuple[str, Mapping[str, Handler]]]] = []
    for file in files:
        try:
            data = load_yaml(file)
        except ConfigError as exc:
            issues += exc.issues
            continue
        kind = _kind(data)
        if kind is None:
            issues.append(
                Issue(
                    "no seed-tool content recognised: expected a sweep (class_name: Sweep, axes), a project "
                    "(class_name: Project, base_output_dir), slurm (class_name: Slurm, sbatch, srun, env), "
                    "monitoring (class_name: SlurmLogMonitor, log_events, state_events) or a defaults list",
                    file=file,
                )
            )
            continue
        readable.append((file, data, kind))
    if issues:
        raise ConfigError(issues)
    t = Translation(_known(config_roots(None, config_dirs)))
    for file, data, (kind, table) in readable:
        site = Path(file).stem.split("_")[0]  # config/slurm/lumi.yaml, lumi_eval.yaml: LUMI's settings
        if kind == "Slurm" and site in SHIPPED_PLATFORMS:
            t.platforms.append((site, SeedKey(file)))
        _translate_mapping(t, data, table, SeedKey(file))
    stem = next((Path(f).stem for f, _, (kind, _) in readable if kind == "Sweep"), Path(files[0]).stem)
    _finish(t, files, name, output_dir, stem)
    # in reading order: file by file, line by line (a note about a whole file first)
    notes = sorted(t.notes, key=lambda note: (files.index(note.file), note.line or 0))
    return Migration(t.config, notes, files)
