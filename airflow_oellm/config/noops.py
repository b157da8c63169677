"""No silent no-ops: sweep axes and run overrides that change no job are refused, by name.

Two experiments of a sweep run the same jobs when everything that reaches a job script is equal:
the sections below, with the experiment's output directory and DAG id masked and the W&B /
TensorBoard identities left out (they name a run; they do not change what it trains). The bare name
is not masked: a name made from a value (`{stage}` -> `cli`) would hide that value where it counts.
A sweep key whose values differ between such twins reaches no job: typically a bare axis name
(`learning_rate`) that lands in `vars.` where nothing refers to it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_oellm.config.errors import ConfigError, Issue, shown
from airflow_oellm.config.overrides import parse_override
from airflow_oellm.config.yamlio import key_line

# sections a job script or a side job is made from (monitoring, restart, dag and vars are not)
JOB_SECTIONS = ("platform", "slurm", "srun", "backend", "conversion", "evaluation", "cooldowns")
# texts only: they describe a platform, they do not reach its jobs
DESCRIPTIVE = {"platform": ("name", "description")}
# mappings rendered as options, where `false` and `null` leave the option out (as if unset)
FLAG_MAPPINGS = {"backend": ("args",), "srun": ("args",), "slurm": ("directives",)}
# backend.args that name a run or say where its logs go, not how it trains
IDENTITY_ARG_PREFIXES = ("wandb_", "tensorboard_")
# what a run override may change without reaching a job script: still a real effect on the run
RUN_SECTIONS = (*JOB_SECTIONS, "monitoring")
# sections the DAG is built from when the file is parsed (Airflow's retries included): a run cannot change them
BUILD_SECTIONS = ("dag.", "project.", "restart.", "tracking.")
EXAMPLE_REPEAT = "`seed: [1, 2]` with `backend.args.seed: ${vars.seed}`, or `backend.args.seed: [1, 2]`"


def job_fingerprint(resolved: Mapping[str, Any]) -> str:
    """Everything of a resolved experiment config that reaches its jobs, identity masked, as text."""
    experiment = resolved.get("experiment") or {}
    relevant = {}
    for section in JOB_SECTIONS:
        value = resolved.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in DESCRIPTIVE.get(section, ())}
            for flags in FLAG_MAPPINGS.get(section, ()):
                if isinstance(value.get(flags), dict):
                    value[flags] = {k: v for k, v in value[flags].items() if v is not None and v is not False}
            if section == "backend" and isinstance(value.get("args"), dict):
                args = value["args"]
                value["args"] = {k: v for k, v in args.items() if not str(k).startswith(IDENTITY_ARG_PREFIXES)}
        relevant[section] = value
    text = json.dumps(relevant, sort_keys=True, default=str)
    for key in ("output_dir", "dag_id"):
        identity = experiment.get(key)
        if isinstance(identity, str) and identity:
            text = text.replace(identity, f"<{key}>")
    return text


@dataclass(frozen=True)
class SweepMember:
    """What the check needs of one experiment."""

    index: int
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    resolved: Mapping[str, Any]
    unresolved: Mapping[str, Any]


def _flat_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _flat_keys(v, key)


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def referrers(unresolved: Mapping[str, Any], target: str) -> list[str]:
    """Keys whose value interpolates `target` (`${vars.k}`, `${eval:... vars.k ...}`)."""
    pattern = re.compile(r"\$\{[^}]*(?<![\w.])" + re.escape(target) + r"(?![\w-])")
    return [
        key
        for key, value in _leaves({k: v for k, v in unresolved.items() if k not in ("vars", "experiment")})
        if isinstance(value, str) and pattern.search(value)
    ]


def _distinct(values: Iterable[Any]) -> list[Any]:
    """Values in order, each once (a sweep value may be a mapping or a list: compared, not hashed)."""
    found: list[Any] = []
    for value in values:
        if value not in found:
            found.append(value)
    return found


def _initials(name: str) -> str:
    return "".join(part[0] for part in re.split(r"[_\-]+", name) if part)


@dataclass(frozen=True)
class KeySuggestion:
    """The config key, or config group, a sweep axis name probably meant."""

    key: str
    group: bool  # a config group: the axis values are its option names


def suggested_key(
    axis: str, values: Sequence[Any], resolved: Mapping[str, Any], groups: Mapping[str, Sequence[str]]
) -> KeySuggestion | None:
    """`learning_rate` -> `backend.args.lr`, `model_size: [50M, 100M]` -> the group `model`, or None.

    `resolved` is any config holding the candidate keys (only its keys are read).
    """
    leaf = axis.rsplit(".", 1)[-1]
    for group, options in groups.items():
        texts = {str(v) for v in values}
        if texts and texts <= set(options):
            return KeySuggestion(group, group=True)
    sections = {k: v for k, v in resolved.items() if k in JOB_SECTIONS}
    candidates = [k for k in _flat_keys(sections) if k != axis]
    by_leaf: dict[str, list[str]] = {}
    for key in candidates:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)

    def best(leaves: Iterable[str]) -> KeySuggestion | None:
        # backend.args first: the training's own flags are what a sweep axis most often means
        found = sorted(
            (k for name in leaves for k in by_leaf.get(name, [])), key=lambda k: not k.startswith("backend.args.")
        )
        return KeySuggestion(found[0], group=False) if found else None

    normal = leaf.replace("-", "_")
    initials = [_initials(normal)] if "_" in normal else []
    close = difflib.get_close_matches(normal, list(by_leaf), n=3, cutoff=0.75)
    return best([normal]) or best(initials) or best(close)


def suggestion_text(
    axis: str, values: Sequence[Any], resolved: Mapping[str, Any], groups: Mapping[str, Sequence[str]]
) -> str | None:
    """`suggested_key` as words for a message: "`backend.args.lr`" or "the config group `model` (...)"."""
    found = suggested_key(axis, values, resolved, groups)
    if found is None:
        return None
    if found.group:
        return f"the config group `{found.key}` (an axis `{found.key}: [{', '.join(map(str, values))}]`)"
    return f"`{found.key}`"


def inert_axes(members: Sequence[SweepMember], groups: Mapping[str, Sequence[str]], file: str | None) -> list[Issue]:
    """Issues for sweep keys whose values differ between experiments that would run the same jobs."""
    twins: dict[str, list[SweepMember]] = {}
    for member in members:
        twins.setdefault(job_fingerprint(member.resolved), []).append(member)
    repeated = [group for group in twins.values() if len(group) > 1]
    if not repeated:
        return []
    keys: list[str] = []
    for group in repeated:
        for member in group:
            for key, value in member.values.items():
                if key not in keys and any(other.values.get(key) != value for other in group):
                    keys.append(key)
    first = repeated[0]
    a, b = first[0], first[1]
    differ = [k for k in dict.fromkeys([*a.values, *b.values]) if a.values.get(k) != b.values.get(k)]
    alike = sum(len(group) for group in repeated)
    if not keys:  # the very same point twice (a list group repeating an entry)
        return [
            Issue(
                f"#{a.index} and #{b.index} are the same point: {alike} experiments would run identical jobs; "
                "drop the repeated entry, or sweep a value that reaches the job, e.g. " + EXAMPLE_REPEAT,
                key="sweep",
                file=file,
                line=key_line(file, "sweep"),
            )
        ]
    example = f"#{a.index} and #{b.index} differ only in {', '.join(differ)}"
    issues = []
    for key in keys:
        values = _distinct(m.values.get(key) for group in repeated for m in group)
        source = next((m.sources[key] for m in members if key in m.sources), "sweep")
        where = re.sub(r"\[\d+\]$", "", source)
        target = key if "." in key or key in a.resolved or key in groups else f"vars.{key}"
        reach = ""
        if target.startswith("vars."):
            users = referrers(a.unresolved, target)
            reach = (
                f": it sets {target}, which only names, paths and W&B/TensorBoard identities use ({', '.join(users)}),"
                if users
                else f": it sets {target}, which nothing refers to,"
            )
        hint = suggestion_text(key, values, a.resolved, groups)
        meant = f"; did you mean {hint}?" if hint else "."
        issues.append(
            Issue(
                f"changes no job{reach} so {alike} experiments would run identical jobs ({example}){meant} "
                f"To repeat a run on purpose, sweep a value that reaches the job, e.g. {EXAMPLE_REPEAT}",
                key=where,
                file=file,
                line=key_line(file, where),
            )
        )
    return issues


def run_effect(config: Mapping[str, Any]) -> str:
    """What a run's resolved config changes about its jobs and how they are watched and retried."""
    effect = {k: config.get(k) for k in RUN_SECTIONS}
    return json.dumps(effect, sort_keys=True, default=str)


def inert_overrides(
    resolve: Callable[[list[str]], Mapping[str, Any]], overrides: Sequence[str], with_all: Mapping[str, Any]
) -> list[Issue]:
    """The run overrides that change nothing: each is refused by name.

    One at a time, in order: an override whose removal leaves the run the same is inert, and the ones
    after it are judged without it (of two overrides setting one value, the first is the inert one).
    `resolve(overrides)` gives the run's resolved config under those overrides; `with_all` is it under
    all of them.
    """
    full = run_effect(with_all)
    kept = list(overrides)
    issues = []
    for text in overrides:
        rest = list(kept)
        rest.remove(text)
        try:
            without = resolve(rest)
        except ConfigError:
            continue  # another override needs this one (it adds a key the other sets): it has an effect
        if run_effect(without) != full:
            continue
        kept = rest
        key = parse_override(text).key
        twin = next((o for o in rest if parse_override(o).key == key), None)
        if twin is not None:
            reason = f"override {shown(twin)} sets the same key"
        elif key.startswith("vars."):
            reason = "no job setting refers to this variable"
        elif key.startswith(BUILD_SECTIONS):
            reason = (
                "the DAG is built when the file is parsed (its retries, budgets, schedule and W&B sync too); "
                "a run cannot change it"
            )
        else:
            reason = "it sets the value the run already has"
        issues.append(Issue(f"override {shown(text)} changes nothing this run submits or watches: {reason}", key=key))
    return issues


def unbuilt_branches(config: Mapping[str, Any], checkpoint_branch: bool, cooldown_branch: bool) -> list[Issue]:
    """What a run's config asks for that its DAG has no tasks for (the DAG was built without them)."""
    issues = []
    conversion = config.get("conversion") or {}
    if conversion.get("enabled", True) and not checkpoint_branch:
        issues.append(
            Issue(
                "this DAG has no checkpoint branch (its sweep disables conversion); enable it in the sweep file",
                key="conversion.enabled",
            )
        )
    if config.get("cooldowns") and not cooldown_branch:
        message = "this DAG has no cooldown branch (its sweep has no cooldowns); add them in the sweep file"
        issues.append(Issue(message, key="cooldowns"))
    return issues
