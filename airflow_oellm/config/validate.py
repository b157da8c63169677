"""Strict validation of plain config containers against the schema dataclasses.

Unknown keys, wrong types and missing required keys become `Issue`s with the key path (and a
"did you mean" where a known key is close). All issues are collected, not only the first.
Strings that still contain `${` are interpolations resolved later (escaped ones resolve at run
time); they are accepted here for any type and checked again once resolved.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from airflow_oellm.config.errors import ConfigError, Issue, did_you_mean, join_key, shown
from airflow_oellm.config.schema import SEED_CLASS_NAMES, SEED_KEYS


@dataclasses.dataclass(frozen=True)
class _Field:
    type: Any
    required: bool


@cache
def schema_fields(cls: type) -> dict[str, _Field]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: _Field(
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    }


def is_unresolved(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _describe(value: Any) -> str:
    text = shown(value)
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{kind.get(type(value), type(value).__name__)} {text}"


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is Any:
        return "anything"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _same_shape(value: Any, tp: Any) -> bool:
    """A mapping for a section or a mapping type, a list for a list type."""
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or get_origin(tp) is dict
    return isinstance(value, list) and get_origin(tp) is list


class Validator:
    """Checks one container; `issues` collects what is wrong."""

    def __init__(self, *, partial: bool = False):
        self.partial = partial
        self.issues: list[Issue] = []

    def check(self, value: Any, tp: Any, key: str = "") -> Any:
        if tp is Any:
            return value
        if is_unresolved(value):
            # once resolved, a `${...}` left is a run-time one; but the DAG is built from sections, lists
            # and mappings at parse time: they cannot wait for the run (a raw file's are resolved later)
            if not self.partial and (dataclasses.is_dataclass(tp) or get_origin(tp) in (list, dict)):
                return self._bad(key, f"expected {type_name(tp)}, got a run-time interpolation {shown(value)}")
            return value
        if dataclasses.is_dataclass(tp):
            return self._dataclass(value, tp, key)
        origin = get_origin(tp)
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
                hint = did_you_mean(str(value), [str(c) for c in choices])
                self._bad(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
            return value
        if origin in (Union, types.UnionType):
            return self._union(value, get_args(tp), key)
        if origin is list:
            if not isinstance(value, list):
                return self._bad(key, f"expected a list, got {_describe(value)}")
            (item_tp,) = get_args(tp)
            return [self.check(v, item_tp, join_key(key, i)) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                return self._bad(key, f"expected a mapping, got {_describe(value)}")
            _, val_tp = get_args(tp)
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    self._bad(join_key(key, k), f"keys must be strings, got {_describe(k)}")
                    continue
                out[k] = self.check(v, val_tp, join_key(key, k))
            return out
        return self._scalar(value, tp, key)

    def _bad(self, key: str, message: str) -> None:
        self.issues.append(Issue(message, key=key))
        return None

    def _scalar(self, value: Any, tp: Any, key: str) -> Any:
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    return float(value)
                except OverflowError:
                    return self._bad(key, f"number too large, got {_describe(value)}")
        elif tp is str:
            if isinstance(value, str):
                return value
            # YAML reads `account: 12345` or `version: 1.0` as numbers; their text is what was meant.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        elif tp is type(None) and value is None:
            return None
        return self._bad(key, f"expected {type_name(tp)}, got {_describe(value)}")

    def _union(self, value: Any, members: tuple[Any, ...], key: str) -> Any:
        if value is None and type(None) in members:
            return None
        # exact scalar types first, so `int | str` keeps 7200 an int
        ordered = sorted(members, key=lambda t: 0 if type(value) is t else 1)
        shaped = []  # the trials of the members a value of this shape is meant for (a mapping: a section)
        for member in ordered:
            if member is type(None):
                continue
            trial = Validator(partial=self.partial)
            result = trial.check(value, member, key)
            if not trial.issues:
                return result
            if _same_shape(value, member):
                shaped.append(trial)
        if len(shaped) == 1:  # its own complaint (an unknown key, a bad value) says more than "expected ..."
            self.issues += shaped[0].issues
            return None
        return self._bad(key, f"expected {' or '.join(type_name(m) for m in members)}, got {_describe(value)}")

    def _dataclass(self, value: Any, cls: type, key: str) -> Any:
        if not isinstance(value, dict):
            return self._bad(key, f"expected a mapping, got {_describe(value)}")
        fields = schema_fields(cls)
        before = len(self.issues)
        seed_class = SEED_CLASS_NAMES.get(cls)
        for k in value:
            if k == "class_name" and seed_class is not None and k not in fields:
                if value[k] != seed_class:
                    self._bad(join_key(key, k), f"only {seed_class!r} is accepted here, got {shown(value[k])}")
                continue
            if k not in fields:
                if k in SEED_KEYS:
                    self._bad(join_key(key, k), f"unknown key (the seed tool's format): {SEED_KEYS[k]}")
                    continue
                hint = did_you_mean(str(k), fields)
                self._bad(join_key(key, k), f"unknown key{hint}; allowed: {', '.join(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = self.check(value[name], f.type, join_key(key, name))
            elif f.required and not self.partial:
                self._bad(join_key(key, name), "missing required key")
        if self.partial or len(self.issues) > before:
            return None
        return cls(**kwargs)


MAX_ITERATIONS = 2**63  # Megatron counts iterations in a 64-bit integer


def learning_rate_value(value: Any) -> float | None:
    """A learning rate from `backend.args` as a number (`3e-4` too, which YAML reads as a string), or None."""
    if isinstance(value, bool):
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return rate if math.isfinite(rate) and rate >= 0 else None


def iteration_arg(args: dict[str, Any], key: str) -> int | None:
    """A Megatron iteration count from `backend.args` (None when unset); anything else names the key."""
    value = args.get(key)
    if value is None or is_unresolved(value):  # resolved at run time (an escaped interpolation)
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value.strip().lstrip("0") or "0"):
        value = int(value.strip().lstrip("0") or "0")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_ITERATIONS:
        message = f"expected a whole number of iterations, got {shown(value)}"
        raise ConfigError(Issue(message, key=f"backend.args.{key}"))
    return value
