"""What sets a run apart: its experiment's resolved config against the sweep's base, and the run's own changes.

A sweep's base is what all its experiments share: a key whose resolved value is the same in every one
of them, once each experiment's identity (name, DAG id, output directory) is masked, since its paths
and run names are made from it. An experiment's differences are the other keys: its value, and the
values the sweep's other experiments take there. The `experiment` section is identity and left out.
A run's changes are the keys its overrides (trigger form, `--conf`) set to another value than the
experiment's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from airflow_oellm.config.sweep import flatten_mapping

IDENTITY_SECTION = "experiment"
IDENTITY_KEYS = ("output_dir", "dag_id", "name")  # longest masked first: a name is part of its output dir
MAX_OTHERS = 5  # values of other experiments listed per key; the rest are counted


def _masked(value: Any, identity: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for key, text in identity.items():
            value = value.replace(text, f"<{key}>")
    elif isinstance(value, list):
        return [_masked(v, identity) for v in value]
    elif isinstance(value, dict):
        return {k: _masked(v, identity) for k, v in value.items()}
    return value


def _canonical(value: Any) -> Any:
    """A hashable stand-in, equal for equal values (1 and True, 1 and 1.0 kept apart, as YAML reads them)."""
    if value is None or isinstance(value, str | int | float | bool):
        return type(value).__name__, value
    return json.dumps(value, sort_keys=True, default=str)


def _leaves(resolved: Mapping[str, Any]) -> dict[str, Any]:
    return dict(flatten_mapping({k: v for k, v in resolved.items() if k != IDENTITY_SECTION}))


def _identity(resolved: Mapping[str, Any]) -> dict[str, str]:
    experiment = resolved.get(IDENTITY_SECTION) or {}
    found = {k: experiment.get(k) for k in IDENTITY_KEYS}
    return {k: v for k, v in found.items() if isinstance(v, str) and v}


def sweep_differences(resolved: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Experiment name -> its differences from the sweep's base, in config order:
    `{"key", "value", "others", "more"}`, with `"unset": True` instead of a value where it lacks the key,
    and `"unset_elsewhere"`: how many others lack a key it has."""
    leaves: dict[str, dict[str, Any]] = {}
    for name, config in resolved.items():
        identity = _identity(config)
        leaves[name] = {k: _masked(v, identity) for k, v in _leaves(config).items()}
    values: dict[str, dict[str, Any]] = {}  # key -> canonical text -> the value; keys and values as first seen
    holders: dict[str, int] = {}  # key -> how many experiments have it
    for own in leaves.values():
        for key, value in own.items():
            values.setdefault(key, {}).setdefault(_canonical(value), value)
            holders[key] = holders.get(key, 0) + 1
    varying = [k for k in values if len(values[k]) > 1 or holders[k] < len(leaves)]
    differences: dict[str, list[dict[str, Any]]] = {}
    for name, own in leaves.items():
        rows = []
        for key in varying:
            mine = _canonical(own[key]) if key in own else None
            others = [v for text, v in values[key].items() if text != mine]
            row: dict[str, Any] = {"key": key}
            if mine is None:
                row["unset"] = True
            else:
                row["value"] = own[key]
                if holders[key] < len(leaves):
                    row["unset_elsewhere"] = len(leaves) - holders[key]
            row["others"], row["more"] = others[:MAX_OTHERS], max(len(others) - MAX_OTHERS, 0)
            rows.append(row)
        differences[name] = rows
    return differences


def run_changes(experiment: Mapping[str, Any], run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The keys whose value a run changed: `{"key", "experiment", "run"}` (a side lacking the key has
    `"unset": "experiment"` or `"unset": "run"`), in config order."""
    before, after = dict(flatten_mapping(experiment)), dict(flatten_mapping(run))
    changes = []
    for key in dict.fromkeys([*after, *before]):
        if key in before and key in after and _canonical(before[key]) == _canonical(after[key]):
            continue
        row: dict[str, Any] = {"key": key}
        for side, leaves in (("experiment", before), ("run", after)):
            if key in leaves:
                row[side] = leaves[key]
            else:
                row["unset"] = side
        changes.append(row)
    return changes
