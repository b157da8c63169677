"""Stable names and paths: pure functions of a sweep point.

The experiment name comes from `sweep.name_template` (`"{model}_lr{backend.args.lr}"`); every
path of an experiment derives from it and `project.base_output_dir`, never from a time or job id,
so retries, restarts and re-parses agree. Only SLURM log file names carry the job id (`%j`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_NAME_LENGTH = 120
DAG_ID_PREFIX = "oellm"
_FIELD = re.compile(r"\{([^{}:!]*)(?::([^{}]*))?\}")
# characters a path may hold on its way into a quoted script (no whitespace, quotes or shell syntax)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.\-+=,@%/]*$")


class NamingError(ValueError):
    pass


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def resolve_field(name: str, fields: Mapping[str, Any]) -> Any:
    """A template field: an exact key, else the one key whose last dotted part matches."""
    if name in fields:
        return fields[name]
    matches = [k for k in fields if k.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return fields[matches[0]]
    if len(matches) > 1:
        raise NamingError(f"field {{{name}}} is ambiguous: {', '.join(sorted(matches))}; write the full key")
    raise NamingError(f"unknown field {{{name}}}; available: {', '.join(sorted(fields)) or 'none'}")


def render_template(template: str, fields: Mapping[str, Any]) -> str:
    """`{key}` / `{key:format}` substitution; `{{` and `}}` are literal braces."""
    parts: list[str] = []
    pos = 0
    text = template.replace("{{", "\0").replace("}}", "\1")
    for m in _FIELD.finditer(text):
        parts.append(text[pos : m.start()])
        value = resolve_field(m.group(1).strip(), fields)
        spec = m.group(2)
        if spec:
            try:
                parts.append(format(value, spec))
            except (ValueError, TypeError) as exc:
                raise NamingError(f"cannot format {value!r} with '{spec}': {exc}") from None
        else:
            parts.append(format_value(value))
        pos = m.end()
    parts.append(text[pos:])
    rendered = "".join(parts)
    if "{" in rendered or "}" in rendered:
        raise NamingError(f"unbalanced braces in template {template!r}")
    return rendered.replace("\0", "{").replace("\1", "}")


def check_name(name: str, what: str = "experiment name") -> str:
    if not name:
        raise NamingError(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NamingError(f"{what} {name!r} is longer than {MAX_NAME_LENGTH} characters")
    if not NAME_PATTERN.match(name):
        bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9_.\-]", c)})
        shown = " ".join(repr(c) for c in bad) or "its first character"
        raise NamingError(
            f"{what} {name!r} is not safe for file names and DAG ids: {shown} not allowed "
            "(use letters, digits, '_', '.', '-'; start with a letter or digit; "
            "format numbers in the template, e.g. {lr:.0e} gives 1e-04)"
        )
    return name


def check_output_root(path: str, what: str = "project.base_output_dir") -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise NamingError(f"{what} must be an absolute path on the cluster, got {path!r}")
    normal = posixpath.normpath(path)
    if not _SAFE_PATH.match(normal) or "/../" in f"{normal}/":
        raise NamingError(
            f"{what} {path!r} has characters that are not safe in paths (allowed: letters, digits, / _ . - + = , @ %)"
        )
    return normal


def dag_id(sweep: str, name: str) -> str:
    return f"{DAG_ID_PREFIX}__{sweep}__{name}"
