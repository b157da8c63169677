"""Composition: `defaults:` lists over config groups, merged in order, remembering which file set what.

A config root is a directory of groups (`platform/`, `backend/`, `monitoring/`, ...), each holding
options (`platform/lumi.yaml`). Roots are searched in order: extra directories (`--config-dir`,
`$OELLM_CONFIG_PATH`), the project's `config/` that contains the sweep file, the built-in one.

Defaults lists, in the sweep (primary) file:
    - platform: lumi          group option
    - platform: ${platform_detect:}   interpolated choice (resolvers and ${oc.env:...})
    - monitoring: null        no option for this group
    - some/file               a file relative to a config root
    - _self_                  where this file's own keys merge (default: last)
In a group option file, `- base` names an option of the same group; `- group: option` any group.
Every group file merges at the top level of the config (it may set any section).
Groups the primary file does not pick get their standard option (`STANDARD_DEFAULTS`).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from airflow_oellm.config.errors import ConfigError, Issue, did_you_mean, join_key, shown
from airflow_oellm.config.schema import PROTECTED_SECTIONS, RootConfig
from airflow_oellm.config.validate import Validator
from airflow_oellm.config.yamlio import key_line, load_yaml
from airflow_oellm.deprecation import ConfigDeprecationWarning

CONFIG_PATH_ENV = "OELLM_CONFIG_PATH"
STANDARD_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("platform", "base"),
    ("backend", "megatron"),
    ("monitoring", "default"),
)
SELF = "_self_"
# directories of a config root that are not config groups
NOT_GROUPS = frozenset({"sweeps", "templates"})
MAX_OPTION_PART = 200  # characters of a file name part: below every file system's limit
# group options renamed, old name -> new: the old name still composes for one release, with a warning
RENAMED_OPTIONS: dict[tuple[str, str], str] = {("platform", "local"): "devcluster"}
_OPTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


def builtin_config_root() -> Path:
    """Config groups shipped with the package (inside wheels) or at the repository root (editable)."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_builtin_config"
    return packaged if packaged.is_dir() else here.parent / "config"


def project_config_root(path: str | os.PathLike[str]) -> Path | None:
    """The nearest directory above a sweep file that holds config groups."""
    start = Path(path).resolve().parent
    for directory in (start, *start.parents):
        if any((directory / group).is_dir() for group, _ in STANDARD_DEFAULTS):
            return directory
    return None


def config_roots(sweep_file: str | os.PathLike[str] | None = None, extra: Iterable[str] = ()) -> tuple[Path, ...]:
    roots: list[Path] = [Path(p) for p in extra if p]
    roots += [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(":") if p]
    if sweep_file is not None:
        found = project_config_root(sweep_file)
        if found is not None:
            roots.append(found)
    roots.append(builtin_config_root())
    unique: list[Path] = []
    for root in roots:
        resolved = root.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return tuple(unique)


def validate_option_name(group: str, option: str) -> str | None:
    """Why a group option name is unsafe or malformed, or None when it is fine."""
    if not isinstance(option, str) or not _OPTION.match(option) or ".." in option.split("/"):
        return f"invalid option {shown(option)} for group '{group}' (letters, digits, _ . - and / only)"
    if any(len(part) > MAX_OPTION_PART for part in option.split("/")):
        return f"invalid option {shown(option)} for group '{group}' (a name longer than {MAX_OPTION_PART} characters)"
    return None


@dataclass(frozen=True)
class Where:
    """Where an entry was written; the line is looked up only when an error is reported."""

    key: str
    file: str | None

    def issue(self, message: str) -> Issue:
        return Issue(message, self.key, self.file, key_line(self.file, self.key))

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.issue(message))


@dataclass
class Composed:
    """A composed, still unresolved config and where each key came from."""

    data: dict[str, Any]
    origins: dict[str, str]
    choices: dict[str, str | None]
    files: list[str] = field(default_factory=list)
    # key -> the path its origin file wrote it under, where that differs (sweep values: `sweep.axes.<key>`)
    written_at: dict[str, str] = field(default_factory=dict)

    def origin(self, key: str) -> str | None:
        """File that set a dotted key (or its nearest parent, or else the first key it holds)."""
        probe = key
        while probe:
            if probe in self.origins:
                return self.origins[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        # a section made from a dotted key alone (`a.b: 1` swept): the file that wrote a key under it
        return next((file for k, file in self.origins.items() if k.startswith((f"{key}.", f"{key}["))), None)

    def issue(self, message: str, key: str) -> Issue:
        file = self.origin(key)
        return Issue(message, key=key, file=file, line=key_line(file, self._written_at(key)))

    def _written_at(self, key: str) -> str:
        probe = key
        while probe:
            if probe in self.written_at:
                return self.written_at[probe] + key[len(probe) :]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return key


def deep_merge(
    dst: dict[str, Any], src: Mapping[str, Any], origin: str, origins: dict[str, str], prefix: str = ""
) -> None:
    """Merge `src` into `dst` (mappings recursively, everything else replaced), recording origins."""
    for k, v in src.items():
        key = join_key(prefix, k)
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v, origin, origins, key)
            continue
        if isinstance(dst.get(k), dict):
            for stale in [o for o in origins if o.startswith(key + ".")]:
                del origins[stale]
        dst[k] = copy.deepcopy(v)
        origins[key] = origin


@lru_cache(maxsize=256)
def _group_options(root: Path, group: str) -> tuple[str, ...]:
    directory = root / group
    if not directory.is_dir():
        return ()
    return tuple(sorted(str(p.relative_to(directory).with_suffix("")) for p in directory.rglob("*.yaml")))


class Composer:
    """Loads and merges config files along defaults lists, over a search path of config roots."""

    def __init__(self, roots: Iterable[Path]):
        self.roots = tuple(roots)

    def groups(self) -> list[str]:
        found = {p.name for root in self.roots if root.is_dir() for p in root.iterdir() if p.is_dir()}
        return sorted(found - NOT_GROUPS)

    def options(self, group: str) -> list[str]:
        return sorted({o for root in self.roots for o in _group_options(root, group)})

    def find(self, relative: str) -> Path | None:
        for root in self.roots:
            candidate = root / f"{relative}.yaml"
            try:
                if candidate.is_file():
                    return candidate
            except OSError:  # a name the file system refuses (too long): no such file
                continue
        return None

    def _option_file(self, group: str, option: str, where: Where) -> Path:
        bad = validate_option_name(group, option)
        if bad:
            raise where.error(bad)
        path = self.find(f"{group}/{option}")
        if path is None:
            options = self.options(group)
            if not options:
                message = f"unknown config group '{group}'{did_you_mean(group, self.groups())}; groups: " + (
                    ", ".join(self.groups()) or "none"
                )
            else:
                message = (
                    f"no option '{option}' in group '{group}'{did_you_mean(option, options)}; "
                    f"options: {', '.join(options)}"
                )
            raise where.error(message)
        return path

    def compose(
        self,
        primary_file: str | None,
        primary: Mapping[str, Any],
        choices: Mapping[str, str | None] | None = None,
    ) -> Composed:
        """Compose a primary config; `choices` replace or add group options (`platform=lumi`)."""
        origin = primary_file or "<config>"
        body = {k: v for k, v in primary.items() if k != "defaults"}
        entries = self._parse_defaults(primary.get("defaults", []), origin, group=None)
        picked = {e[1] for e in entries if e[0] == "group"}
        standard = [("group", g, o, Where("defaults", origin)) for g, o in STANDARD_DEFAULTS if g not in picked]
        entries = standard + entries
        if not any(e[0] == "self" for e in entries):
            entries.append(("self", "", "", Where("defaults", origin)))
        overrides = dict(choices or {})
        resolved_choices: dict[str, str | None] = {}
        for i, entry in enumerate(entries):
            if entry[0] == "group" and entry[1] in overrides:  # an error names the override, not the entry
                entries[i] = ("group", entry[1], overrides.pop(entry[1]), Where(f"override {entry[1]}", origin))
        for group, option in overrides.items():  # groups the defaults did not mention
            entries.insert(len(entries) - 1, ("group", group, option, Where(f"override {group}", origin)))

        composed = Composed(data={}, origins={}, choices=resolved_choices)
        for kind, name, option, where in entries:
            if kind == "self":
                self._merge_source(composed, origin, body)
            elif kind == "group":
                option = self._resolve_choice(name, option, where)
                resolved_choices[name] = option
                if option is not None:
                    self._merge_file(composed, self._option_file(name, option, where), name, [primary_file or ""])
            else:
                path = self.find(name)
                if path is None:
                    raise where.error(f"config file '{name}.yaml' not found in {self._roots_text()}")
                self._merge_file(composed, path, None, [primary_file or ""])
        return composed

    def compose_file(self, path: Path) -> Composed:
        """Compose a single group option file on its own (for `airflow-oellm validate`)."""
        composed = Composed(data={}, origins={}, choices={})
        group = path.resolve().parent.name
        self._merge_file(composed, path.resolve(), group if group in self.groups() else None, [])
        return composed

    def _roots_text(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def _resolve_choice(self, group: str, option: Any, where: Where) -> str | None:
        if option is None:
            return None
        if isinstance(option, str) and "${" in option:
            try:
                option = OmegaConf.to_container(OmegaConf.create({"choice": option}), resolve=True)["choice"]
            except Exception as exc:  # any resolver failure is a config error at this entry
                raise where.error(f"cannot resolve option for group '{group}': {exc}") from None
        if not isinstance(option, str):
            raise where.error(f"option for group '{group}' must be a string, got {option!r}")
        renamed = RENAMED_OPTIONS.get((group, option))
        if renamed is not None and self.find(f"{group}/{option}") is None:  # a config root's own file wins
            notice = f"the {group} '{option}' is now '{renamed}' (the old name is removed in the next release)"
            warnings.warn(
                str(where.issue(notice)),
                ConfigDeprecationWarning,
                stacklevel=2,
            )
            return renamed
        return option

    def _parse_defaults(self, raw: Any, file: str, group: str | None) -> list[tuple[str, str, Any, Where]]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ConfigError(Issue("defaults must be a list", "defaults", file, key_line(file, "defaults")))
        entries: list[tuple[str, str, Any, Where]] = []
        for i, item in enumerate(raw):
            key = f"defaults[{i}]"
            where = Where(key, file)
            if item == SELF:
                entries.append(("self", "", "", where))
            elif isinstance(item, str):
                if group is not None and "/" not in item:
                    entries.append(("group", group, item, where))
                else:
                    bad = validate_option_name("defaults", item)
                    if bad:
                        raise where.error(bad)
                    entries.append(("file", item, "", where))
            elif isinstance(item, dict) and len(item) == 1:
                ((g, option),) = item.items()
                g = str(g).removeprefix("/")
                if g.startswith("optional "):
                    g = g.removeprefix("optional ").strip()
                    if self.find(f"{g}/{option}") is None:
                        continue
                entries.append(("group", g, option, where))
            else:
                raise where.error(
                    f"each defaults entry must be '_self_', a file name or one 'group: option' pair, got {item!r}"
                )
        return entries

    def _merge_source(self, composed: Composed, file: str, data: Mapping[str, Any]) -> None:
        check_file_keys(file, data)
        deep_merge(composed.data, data, file, composed.origins)
        composed.files.append(file)

    def _merge_file(self, composed: Composed, path: Path, group: str | None, stack: list[str]) -> None:
        file = str(path)
        if file in stack:
            chain = " -> ".join([*stack[1:], file]) if len(stack) > 1 else file
            raise ConfigError(Issue(f"defaults form a cycle: {chain}", "defaults", file, key_line(file, "defaults")))
        data = load_yaml(path)
        entries = self._parse_defaults(data.get("defaults", []), file, group)
        body = {k: v for k, v in data.items() if k != "defaults"}
        if not any(e[0] == "self" for e in entries):
            entries.append(("self", "", "", Where("defaults", file)))
        for kind, name, option, where in entries:
            if kind == "self":
                self._merge_source(composed, file, body)
            elif kind == "group":
                option = self._resolve_choice(name, option, where)
                if option is not None:
                    composed.choices.setdefault(name, option)
                    self._merge_file(composed, self._option_file(name, option, where), name, [*stack, file])
            else:
                target = self.find(name)
                if target is None:
                    raise where.error(f"config file '{name}.yaml' not found in {self._roots_text()}")
                self._merge_file(composed, target, None, [*stack, file])


def check_file_keys(file: str, data: Mapping[str, Any]) -> None:
    """Unknown keys and wrong types in one file, reported against that file before merging."""
    issues = []
    for section in PROTECTED_SECTIONS & set(data):
        issues.append(
            Issue(
                "is set by the sweep planner and cannot be set in a config file",
                key=section,
                file=file,
                line=key_line(file, section),
            )
        )
    validator = Validator(partial=True)
    validator.check({k: v for k, v in data.items() if k not in PROTECTED_SECTIONS}, RootConfig)
    issues += [Issue(i.message, i.key, file, key_line(file, i.key)) for i in validator.issues]
    if issues:
        raise ConfigError(issues)
