"""Dotted overrides, as on a command line or in a trigger's `overrides` list.

    key=value      set an existing key (one the config or the schema knows)
    +key=value     add a key that does not exist yet
    ++key=value    set or add
    ~key           delete a key
    group=option   pick another option of a config group (`platform=lumi`)
Values are read as YAML (`3e-4`, `true`, `null`, `[a, b]`, `{k: v}`); anything else stays a string.
Keys may address literal dotted keys such as sweep axes: `sweep.axes.backend.args.lr=[0.1,0.2]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin

import yaml
from omegaconf import OmegaConf

from airflow_oellm.config.errors import ConfigError, Issue, did_you_mean, shown
from airflow_oellm.config.schema import PROTECTED_SECTIONS, RootConfig
from airflow_oellm.config.validate import schema_fields
from airflow_oellm.config.yamlio import unescape_double_dollar

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")


@dataclass(frozen=True)
class Override:
    text: str
    key: str
    value: Any
    mode: str  # "set" | "add" | "force" | "delete"

    @property
    def origin(self) -> str:
        return f"<override {self.text!r}>"


def parse_value(text: str) -> Any:
    if text == "":
        return ""
    try:
        cfg = OmegaConf.create(f"v: {text}")
        value = OmegaConf.to_container(cfg, resolve=False)["v"]  # type: ignore[index]
    except Exception:  # not YAML: keep the text as given
        return text
    return unescape_double_dollar(value)


def parse_override(text: str) -> Override:
    if not isinstance(text, str):
        raise ConfigError(Issue(f"override must be a string like key=value, got {text!r}"))
    mode = "set"
    body = text.strip()
    if body.startswith("~"):
        mode, body = "delete", body[1:]
    elif body.startswith("++"):
        mode, body = "force", body[2:]
    elif body.startswith("+"):
        mode, body = "add", body[1:]
    key, eq, raw = body.partition("=")
    key = key.strip()
    if not _KEY.match(key):
        raise ConfigError(Issue(f"invalid override {shown(text)}: expected key=value, +key=value or ~key"))
    if not eq and mode != "delete":
        raise ConfigError(Issue(f"invalid override {shown(text)}: missing '=value' (a leading ~ deletes a key)"))
    try:
        value = parse_value(raw.strip()) if eq else None
    except yaml.YAMLError:
        value = raw
    return Override(text=text, key=key, value=value, mode=mode)


def parse_overrides(texts: Iterable[str]) -> list[Override]:
    return [parse_override(t) for t in texts]


def split_group_choices(
    overrides: Iterable[Override], groups: Iterable[str]
) -> tuple[dict[str, str | None], list[Override]]:
    """Separate `group=option` overrides (they change composition) from key overrides."""
    group_names = set(groups)
    choices: dict[str, str | None] = {}
    rest: list[Override] = []
    for o in overrides:
        if "." not in o.key and o.key in group_names and not isinstance(o.value, dict):
            if o.mode != "delete" and o.value is not None and not isinstance(o.value, str):
                raise ConfigError(
                    Issue(
                        f"'{o.key}' is a config group: it takes an option name, got {shown(o.value)}",
                        key=o.key,
                        file=o.origin,
                    )
                )
            choices[o.key] = None if o.mode == "delete" else o.value
        else:
            rest.append(o)
    return choices, rest


def _schema_knows(path: list[str]) -> bool:
    tp: Any = RootConfig
    for part in path:
        if dataclasses.is_dataclass(tp):
            fields = schema_fields(tp)
            if part not in fields:
                return False
            tp = fields[part].type
        elif get_origin(tp) is dict:
            return False
        else:
            return False
    return True


def _schema_children(path: list[str]) -> list[str]:
    tp: Any = RootConfig
    for part in path:
        if not dataclasses.is_dataclass(tp) or part not in schema_fields(tp):
            return []
        tp = schema_fields(tp)[part].type
    while get_origin(tp) is not None and type(None) in get_args(tp):
        tp = next(a for a in get_args(tp) if a is not type(None))
    return list(schema_fields(tp)) if dataclasses.is_dataclass(tp) else []


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a plain config, or None where there is none."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def locate(data: Mapping[str, Any], key: str) -> tuple[list[str], bool]:
    """Split a dotted key into the literal keys it addresses in `data`; True if it exists."""
    parts = key.split(".")
    node: Any = data
    path: list[str] = []
    i = 0
    while i < len(parts):
        if not isinstance(node, Mapping):
            return [*path, ".".join(parts[i:])], False
        for j in range(len(parts), i, -1):
            candidate = ".".join(parts[i:j])
            if candidate in node:
                path.append(candidate)
                node = node[candidate]
                i = j
                break
        else:
            return path + parts[i:], False
    return path, True


def apply_overrides(data: dict[str, Any], overrides: Iterable[Override]) -> dict[str, str]:
    """Apply key overrides in place; returns {key: origin} for error messages."""
    origins: dict[str, str] = {}
    issues: list[Issue] = []
    for o in overrides:
        path, exists = locate(data, o.key)
        if path[0] in PROTECTED_SECTIONS:
            issues.append(Issue("is set by the sweep planner and cannot be overridden", o.key, o.origin))
            continue
        known = exists or _schema_knows(path)
        if o.mode == "set" and not known:
            parent, _ = locate(data, ".".join(path[:-1])) if len(path) > 1 else ([], True)
            node: Any = data
            for p in parent:
                node = node.get(p, {}) if isinstance(node, Mapping) else {}
            siblings = list(node) if isinstance(node, Mapping) else []
            siblings += _schema_children(path[:-1])
            hint = did_you_mean(path[-1], siblings)
            issues.append(Issue(f"key does not exist{hint}; use +{o.key}=... to add it", o.key, o.origin))
            continue
        if o.mode == "add" and exists:
            issues.append(Issue(f"key already exists; use {o.key}=... to change it", o.key, o.origin))
            continue
        if o.mode == "delete":
            if not exists:
                issues.append(Issue("cannot delete a key that does not exist", o.key, o.origin))
                continue
            node = data
            for p in path[:-1]:
                node = node[p]
            del node[path[-1]]
        else:
            node = data
            for p in path[:-1]:
                child = node.get(p)
                if not isinstance(child, dict):
                    child = node[p] = {}
                node = child
            node[path[-1]] = o.value
        origins[".".join(path)] = o.origin
    if issues:
        raise ConfigError(issues)
    return origins
