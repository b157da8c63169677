"""Which HPC platform are we on? Environment variables, host name patterns and filesystem markers.

Detection is a pure function of a `PlatformProbe` (environment, host name, existing marker paths),
so the same rules run locally (`local_probe()`) and on a remote login node: run `probe_command()`
there over SSH and feed its output to `PlatformProbe.parse()` (slurm/probe.py).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from airflow_oellm.config.overrides import lookup
from airflow_oellm.slurm import probe as slurm_probe
from airflow_oellm.slurm.probe import PlatformProbe

OVERRIDE_ENV = "OELLM_PLATFORM"
_ENV_REFERENCE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class PlatformRule:
    name: str
    env_vars: tuple[str, ...] = ()
    env_values: Mapping[str, str] = field(default_factory=dict)  # variable -> regex on its value
    hostnames: tuple[str, ...] = ()  # regexes searched in the lower-case host name
    generic_hostnames: tuple[str, ...] = ()  # generic names that count only with a marker path
    paths: tuple[str, ...] = ()


# Order matters only when two platforms' markers are present at once (then the first wins).
RULES: tuple[PlatformRule, ...] = (
    PlatformRule(
        "lumi",
        env_vars=("LUMI_PROJECT",),
        env_values={"SLURM_CLUSTER_NAME": r"^lumi$", "LMOD_SYSTEM_NAME": r"^lumi$"},
        hostnames=(r"lumi", r"^uan\d+"),
        generic_hostnames=(r"^nid\d{6}$",),
        paths=("/appl/lumi",),
    ),
    PlatformRule(
        "leonardo",
        env_vars=("LEONARDO_PROJECT",),
        env_values={"SLURM_CLUSTER_NAME": r"^leonardo$"},
        hostnames=(r"leonardo", r"^lrdn\d+"),
        generic_hostnames=(r"^login\d+",),
        paths=("/leonardo", "/leonardo_work", "/leonardo_scratch"),
    ),
    PlatformRule(
        "jupiter",
        env_vars=("JUPITER_PROJECT",),
        env_values={"SYSTEMNAME": r"^jupiter", "SLURM_CLUSTER_NAME": r"^jupiter"},
        hostnames=(r"jupiter", r"^jp(bl|bo|login)"),
    ),
    PlatformRule(
        "juwels",
        env_vars=("JUWELS_PROJECT",),
        env_values={"SYSTEMNAME": r"^juwels", "SLURM_CLUSTER_NAME": r"^juwels"},
        hostnames=(r"juwels", r"^jwlogin\d+", r"^jw[bc]\d+"),
    ),
    PlatformRule(
        "marenostrum",
        env_vars=("MARENOSTRUM_PROJECT",),
        env_values={"BSC_MACHINE": r"^mn5?$", "SLURM_CLUSTER_NAME": r"^(mn5|marenostrum)"},
        hostnames=(r"marenostrum", r"^mn\d"),
        generic_hostnames=(r"^[ag]login\d+",),
        paths=("/gpfs/projects/bsc", "/apps/GPP", "/apps/ACC"),
    ),
    PlatformRule(
        "devcluster",
        env_vars=("SLURM_DEV_CLUSTER",),
        env_values={"SLURM_CLUSTER_NAME": r"^devcluster$"},
        paths=("/etc/slurm/oellm-dev-cluster",),
    ),
)

PLATFORMS = tuple(r.name for r in RULES)


@dataclass(frozen=True)
class Detection:
    name: str
    reason: str


def probed_env_vars() -> list[str]:
    names = {OVERRIDE_ENV}
    for rule in RULES:
        names.update(rule.env_vars)
        names.update(rule.env_values)
    return sorted(names)


def probed_paths() -> list[str]:
    return sorted({p for rule in RULES for p in rule.paths})


def probe_command() -> str:
    """One shell command that prints everything detection needs (run it on a login node)."""
    return slurm_probe.probe_command(probed_env_vars(), probed_paths())


def local_probe() -> PlatformProbe:
    """The facts of this machine."""
    return PlatformProbe(
        env={k: os.environ[k] for k in probed_env_vars() if k in os.environ},
        hostname=socket.gethostname(),
        existing_paths=frozenset(p for p in probed_paths() if os.path.exists(p)),
    )


def detect_platform(probe: PlatformProbe | None = None) -> Detection:
    """The platform these facts point to, or `unknown`, with the reason."""
    probe = probe or local_probe()
    forced = probe.env.get(OVERRIDE_ENV, "").strip()
    if forced:
        return Detection(forced, f"${OVERRIDE_ENV}={forced}")
    host = probe.hostname.lower()
    for rule in RULES:
        for var in rule.env_vars:
            if probe.env.get(var):
                return Detection(rule.name, f"environment variable {var} is set")
        for var, pattern in rule.env_values.items():
            value = probe.env.get(var, "")
            if value and re.search(pattern, value, re.IGNORECASE):
                return Detection(rule.name, f"{var}={value}")
    for rule in RULES:
        for pattern in rule.hostnames:
            if host and re.search(pattern, host):
                return Detection(rule.name, f"host name {probe.hostname!r} matches {pattern!r}")
        for pattern in rule.generic_hostnames:
            marker = next((p for p in rule.paths if p in probe.existing_paths), None)
            if host and marker and re.search(pattern, host):
                return Detection(rule.name, f"host name {probe.hostname!r} matches {pattern!r} and {marker} exists")
    for rule in RULES:
        for path in rule.paths:
            if path in probe.existing_paths:
                return Detection(rule.name, f"{path} exists")
    return Detection(UNKNOWN, f"no rule matched host {probe.hostname!r}")


def _typed_value(config: Any, key: str) -> tuple[bool, Any]:
    """(whether `key` is a config key, its value) in a typed config."""
    node = config
    for part in key.split("."):
        if is_dataclass(node) and part in {f.name for f in fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def unmet_requirements(config: Any, unresolved: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for each key of `platform.requires` the config leaves unset.

    The message names the environment variable that would have set it: a `${oc.env:...}` resolves
    where the sweep is loaded (the Airflow host, at parse time), not on the cluster's login node.
    """
    problems = []
    platform = config.platform.name
    for i, key in enumerate(config.platform.requires):
        known, value = _typed_value(config, key)
        if not known:
            problems.append((f"platform.requires[{i}]", f"{key!r} is not a config key"))
            continue
        if value is not None and value != "":
            continue
        written = lookup(unresolved, key)
        env = _ENV_REFERENCE.search(written) if isinstance(written, str) else None
        where = (
            f"export {env.group(1)} where Airflow loads the sweep (its dag-processor, scheduler and workers; "
            "`${oc.env:...}` resolves there, not on the login node), or set "
            if env
            else "set "
        )
        problems.append(
            (key, f"platform {platform!r} requires it (platform.requires) and it is not set: {where}{key} in the sweep")
        )
    return problems
