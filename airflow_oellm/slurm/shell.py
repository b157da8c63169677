"""Shell safety by construction: every value that reaches a job script goes through here.

Two quoting modes:
- `quote`: fully literal (single quotes), for paths and names the planner built;
- `expandable`: double quotes in which only `$NAME`, `${NAME}` and `${NAME:-word}` expand at job
  time (so configs can say `/tmp/$USER`); quotes, backslashes, backquotes and `$(` stay literal.
`#SBATCH` lines are not shell, but a newline would start one: their values are validated instead.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # an environment variable (also a secret's)
# a remote script's first lines: export the secrets that operations.encode_secrets sent on its stdin
SECRETS_FROM_STDIN = """while IFS='=' read -r name value; do
  [ -n "$name" ] && export "$name=$(printf %s "$value" | base64 -d)"
done"""
_VAR_REF = re.compile(
    r"\$(?:(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[A-Za-z0-9_./:@%+=,\-]*)?\})"
)
_DIRECTIVE_NAME = re.compile(r"^[a-z][a-z0-9\-]*$")
# sbatch splits directive lines on whitespace and handles quotes itself: keep values to plain tokens
_DIRECTIVE_VALUE = re.compile(r"^[\x21\x23\x25-\x26\x28-\x5b\x5d-\x5f\x61-\x7e]*$")
_MODULE = re.compile(r"^[A-Za-z0-9_.+/\-]+$")

SHORT_OPTIONS = {
    "A": "account",
    "a": "array",
    "C": "constraint",
    "c": "cpus-per-task",
    "d": "dependency",
    "e": "error",
    "G": "gpus",
    "J": "job-name",
    "N": "nodes",
    "n": "ntasks",
    "o": "output",
    "p": "partition",
    "q": "qos",
    "t": "time",
    "w": "nodelist",
    "x": "exclude",
}
# set by the naming and submission rules; a config that changed them would break log tailing,
# identity lookup or exactly-once submission
PROTECTED_DIRECTIVES = frozenset({"job-name", "comment", "output", "error", "array", "wrap", "parsable", "wait"})
_EXTRA_LINE = re.compile(r"^#SBATCH\s+(?P<opt>--?[A-Za-z][A-Za-z0-9\-]*)(?:(?:=|\s+)(?P<value>\S+))?\s*$")


class ShellSafetyError(ValueError):
    pass


class ShellSafe(str):
    """Text already made safe for the script; templates emit it unquoted."""


def scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise ShellSafetyError("null has no text form")
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ShellSafetyError(f"expected a string or number, got {type(value).__name__} {value!r}")


def quote(value: Any) -> str:
    """Literal single-quoted word."""
    return shlex.quote(scalar_text(value))


def expandable(value: Any) -> str:
    """Double-quoted word where only environment variable references expand."""
    text = scalar_text(value)
    out: list[str] = []
    pos = 0
    for m in _VAR_REF.finditer(text):
        out.append(_escape_double(text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape_double(text[pos:]))
    return '"' + "".join(out) + '"'


def _escape_double(text: str) -> str:
    return re.sub(r'([\\"`$])', r"\\\1", text)


def check_env_name(name: str) -> str:
    if not isinstance(name, str) or not ENV_NAME.match(name):
        raise ShellSafetyError(f"invalid environment variable name {name!r}")
    return name


def export_lines(env: Mapping[str, Any]) -> list[ShellSafe]:
    return [ShellSafe(f"export {check_env_name(k)}={expandable(v)}") for k, v in env.items() if v is not None]


def check_module(name: str) -> str:
    if not isinstance(name, str) or not _MODULE.match(name):
        raise ShellSafetyError(f"invalid module name {name!r} (letters, digits, _ . + / - only)")
    return name


def directive_name(key: str) -> str:
    name = key.replace("_", "-").lstrip("-")
    if len(name) == 1 and name in SHORT_OPTIONS:
        name = SHORT_OPTIONS[name]
    if not _DIRECTIVE_NAME.match(name):
        raise ShellSafetyError(f"invalid #SBATCH option name {key!r}")
    return name


def directive_value(name: str, value: Any) -> str:
    text = scalar_text(value)
    if not _DIRECTIVE_VALUE.match(text):
        bad = sorted({c for c in text if not _DIRECTIVE_VALUE.match(c)})
        raise ShellSafetyError(
            f"#SBATCH --{name} value {text!r} contains {' '.join(repr(c) for c in bad)}; "
            "directive values cannot hold whitespace, quotes, '$', '\\' or '`' "
            "(sbatch does not expand variables in directives)"
        )
    return text


def parse_extra_directive(line: str) -> tuple[str, Any]:
    """`#SBATCH --gpus-per-node=8` -> ("gpus-per-node", "8"); a bare flag gives True."""
    m = _EXTRA_LINE.match(line.strip()) if isinstance(line, str) else None
    if not m:
        raise ShellSafetyError(f"not a single '#SBATCH --option[=value]' line: {line!r}")
    name = directive_name(m.group("opt"))
    value = m.group("value")
    return name, True if value is None else directive_value(name, value)


def directive_lines(options: Mapping[str, Any]) -> list[ShellSafe]:
    """`#SBATCH` lines from an ordered mapping: True -> bare flag; False/None -> omitted."""
    lines = []
    for key, value in options.items():
        name = directive_name(key)
        if value is None or value is False:
            continue
        if value is True:
            lines.append(ShellSafe(f"#SBATCH --{name}"))
        else:
            lines.append(ShellSafe(f"#SBATCH --{name}={directive_value(name, value)}"))
    return lines


def cli_flags(
    args: Mapping[str, Any], *, quote_word: Any = expandable, spellings: Mapping[str, str] | None = None
) -> list[str]:
    """argv words for `--dashed-name value` options (Megatron style).

    True -> bare flag, False/None -> omitted, a list -> the flag followed by each item. `spellings` names
    the flags of keys that are not spelled with dashes only.
    """
    words: list[str] = []
    for key, value in args.items():
        if not isinstance(key, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", key):
            raise ShellSafetyError(f"invalid argument name {key!r}")
        flag = (spellings or {}).get(key) or "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words.append(flag)
            words.extend(quote_word(v) for v in value)
        elif isinstance(value, Mapping):
            raise ShellSafetyError(f"argument {key!r} is a mapping; arguments take scalars or lists")
        else:
            words += [flag, quote_word(value)]
    return words


def join_words(words: Iterable[str], width: int = 100) -> ShellSafe:
    """Join already-quoted words; a long command gets one `--option [values]` per line."""
    words = list(words)
    flat = " ".join(words)
    if len(flat) <= width:
        return ShellSafe(flat)
    lines: list[list[str]] = [[]]
    for word in words:
        if word.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(word)
    return ShellSafe(" \\\n    ".join(" ".join(line) for line in lines))
