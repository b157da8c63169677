"""Sweep expansion: the `sweep:` section to an ordered list of points.

    sweep:
      name_template: "{model}_lr{lr}_gbsz{global_batch_size}"
      base_values: {backend.args.save_interval: 1000}     # every point
      axes:                                               # cartesian product, last axis fastest
        model: [50M, 100M, 200M]                          # a config group: picks model/50M.yaml
        backend.args.lr: [0.1, 0.01, 0.001]               # a config key
      groups:                                             # composed with the axes by `type`
        - type: list                                      # union of its configs
          defaults: {backend.args.lr_decay_style: WSD}    # under each of its points
          configs:
            - {stage: stable}
            - {type: product, axes: {...}}                # groups nest
      type: product                                       # how axes and groups combine
      filter: "not (model == '200M' and lr == 0.1)"       # keep points where this is true
      early_stop: {at: [2000], within: model, keep: 0.5}  # stop losing points (config/early_stop.py)

A point maps keys to values. A key is a dotted config path, a config group name, or a bare name
(a sweep variable, stored under `vars.`). Points are numbered in full-product order, before the
filter, so an experiment keeps its index when the filter changes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from airflow_oellm.config.errors import Issue, did_you_mean, join_key
from airflow_oellm.config.expressions import Expression, ExpressionError

MAX_POINTS = 100_000
SWEEP_KEYS = ("name", "name_template", "axes", "base_values", "groups", "type", "filter", "class_name", "early_stop")
GROUP_KEYS = ("type", "axes", "configs", "defaults")
GROUP_TYPES = ("product", "list")
_VALUE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")


@dataclass(frozen=True)
class SweepPoint:
    index: int
    values: dict[str, Any]
    # key -> where the sweep section wrote its value (`sweep.axes.backend.args.lr[1]`), for error lines
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


class _Value(NamedTuple):
    """A point's value while expanding, with the sweep path it was written at."""

    value: Any
    source: str


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, Mapping) or not value


class SweepError(ValueError):
    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


def _is_group(entry: Any) -> bool:
    return isinstance(entry, Mapping) and entry.get("type") in GROUP_TYPES and ("axes" in entry or "configs" in entry)


class _Expander:
    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def bad(self, key: str, message: str) -> None:
        self.issues.append(Issue(message, key=key))

    def check_values(self, values: Any, key: str) -> dict[str, _Value]:
        """A point's values with nested mappings flattened: `{backend: {args: {lr: 1}}}` means
        `{backend.args.lr: 1}`, as it would in a config file (the seed guide writes the nested form)."""
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            self.bad(key, f"expected a mapping of key: value, got {type(values).__name__}")
            return {}
        flat: dict[str, _Value] = {}
        for k, value in flatten_mapping(values):
            if not _VALUE_KEY.match(k):
                self.bad(join_key(key, k), "invalid key (use a dotted config path or a plain name)")
            elif k in flat:
                self.bad(join_key(key, k), "set twice (once nested, once as a dotted key)")
            else:
                flat[k] = _Value(value, join_key(key, k))
        return flat

    def size(self, group: Mapping[str, Any], key: str) -> int:
        """Number of points a group expands to, computed without expanding it."""
        kind = group.get("type", "product")
        axes = group.get("axes") or {}
        configs = group.get("configs") or []
        if not isinstance(axes, Mapping) or not isinstance(configs, list):
            return 0
        sizes = [self.size(c, key) if _is_group(c) else 1 for c in configs]
        if kind == "list":
            return sum(sizes)
        leaves = flatten_mapping(axes)
        return math.prod(len(v) if isinstance(v, list) else 1 for _, v in leaves) * math.prod(sizes)

    def expand(self, group: Mapping[str, Any], key: str, *, top: bool = False) -> list[dict[str, _Value]]:
        allowed = SWEEP_KEYS if top else GROUP_KEYS
        for k in group:
            if k not in allowed:
                self.bad(join_key(key, k), f"unknown key{did_you_mean(str(k), allowed)}; allowed: {', '.join(allowed)}")
        kind = group.get("type", "product")
        if kind not in GROUP_TYPES:
            self.bad(join_key(key, "type"), f"must be one of 'product', 'list', got {kind!r}")
            return []
        axes_key = join_key(key, "axes")
        configs_key = join_key(key, "groups" if top else "configs")
        defaults = self.check_values(
            group.get("base_values" if top else "defaults"), join_key(key, "base_values" if top else "defaults")
        )
        axes = group.get("axes") or {}
        configs = group.get("groups" if top else "configs") or []
        if not isinstance(axes, Mapping):
            self.bad(axes_key, f"expected a mapping of key: [values], got {type(axes).__name__}")
            axes = {}
        if not isinstance(configs, list):
            self.bad(configs_key, f"expected a list, got {type(configs).__name__}")
            configs = []

        factors: list[list[dict[str, _Value]]] = []
        seen_axes: set[str] = set()
        # nested axes (`backend: {args: {lr: [...]}}`) name the same axis as `backend.args.lr: [...]`
        for axis, values in flatten_mapping(axes):
            axis_key = join_key(axes_key, axis)
            if axis in seen_axes:
                self.bad(axis_key, "axis given twice (once nested, once as a dotted key)")
                continue
            seen_axes.add(axis)
            if not _VALUE_KEY.match(axis):
                self.bad(axis_key, "invalid axis name (use a dotted config path or a plain name)")
                continue
            if not isinstance(values, list):
                self.bad(axis_key, f"axis values must be a list, got {values!r}")
                continue
            if not values:
                self.bad(axis_key, "axis has no values")
                continue
            factors.append([{axis: _Value(v, join_key(axis_key, j))} for j, v in enumerate(values)])
        for i, entry in enumerate(configs):
            entry_key = join_key(configs_key, i)
            if _is_group(entry):
                factors.append(self.expand(entry, entry_key))
            elif isinstance(entry, Mapping) and "type" in entry:
                self.bad(
                    join_key(entry_key, "type"),
                    f"a nested group needs type 'product' or 'list' and 'axes' or 'configs', got {dict(entry)!r}",
                )
            else:
                factors.append([self.check_values(entry, entry_key)])

        if kind == "list":
            if axes:
                self.bad(axes_key, "a 'list' group has no axes; use 'configs', or type 'product'")
            points = [p for f in factors for p in f]
        else:
            points = [_merge_all(combo) for combo in itertools.product(*factors)] if factors else [{}]
        return [{**defaults, **p} for p in points]


def flatten_mapping(values: Mapping[Any, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) pairs down to the values that are no mapping (or an empty one), as a config
    file's nesting means: `{backend: {args: {lr: 1}}}` gives `("backend.args.lr", 1)`."""
    pairs: list[tuple[str, Any]] = []
    for k, value in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if _is_leaf(value):
            pairs.append((key, value))
        else:
            pairs += flatten_mapping(value, key)
    return pairs


def _merge_all(parts: tuple[dict[str, _Value], ...]) -> dict[str, _Value]:
    merged: dict[str, _Value] = {}
    for part in parts:
        merged.update(part)
    return merged


def filter_variables(values: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Names a filter may use: full keys, unique last parts of dotted keys, and `index`."""
    names: dict[str, Any] = dict(values)
    short: dict[str, list[str]] = {}
    for k in values:
        short.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    for name, keys in short.items():
        if len(keys) == 1 and name not in names:
            names[name] = values[keys[0]]
    names["index"] = index
    return names


def expand_sweep(sweep: Mapping[str, Any] | None) -> list[SweepPoint]:
    """All points of a sweep definition, filtered, in stable order. Raises SweepError."""
    sweep = sweep or {}
    expander = _Expander()
    if not isinstance(sweep, Mapping):
        raise SweepError([Issue(f"expected a mapping, got {type(sweep).__name__}", key="sweep")])
    class_name = sweep.get("class_name")
    if class_name not in (None, "Sweep"):
        expander.bad("sweep.class_name", f"only 'Sweep' is accepted here, got {class_name!r}")
    shape = {"type": sweep.get("type", "product"), "axes": sweep.get("axes"), "configs": sweep.get("groups")}
    total = expander.size(shape, "sweep")
    if total > MAX_POINTS:
        raise SweepError([Issue(f"expands to {total:,} points, more than the limit of {MAX_POINTS:,}", key="sweep")])
    raw = expander.expand({**sweep, "type": sweep.get("type", "product")}, "sweep", top=True)
    if expander.issues:
        raise SweepError(expander.issues)
    points = [
        SweepPoint(i, {k: v.value for k, v in values.items()}, {k: v.source for k, v in values.items()})
        for i, values in enumerate(raw)
    ]
    condition = sweep.get("filter")
    if condition in (None, ""):
        return points
    if not isinstance(condition, str):
        raise SweepError([Issue(f"must be an expression string, got {condition!r}", key="sweep.filter")])
    try:
        expression = Expression(condition)
        kept = [p for p in points if expression.evaluate(filter_variables(p.values, p.index))]
    except ExpressionError as exc:
        raise SweepError([Issue(str(exc), key="sweep.filter")]) from None
    return kept
