"""Configuration errors that say where the problem is: file, line, key path, and a likely fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem in the configuration."""

    message: str
    key: str = ""
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f"{self.key}: " if self.key else ""
        return f"{where}: {key}{self.message}"


class ConfigError(ValueError):
    """Raised for any invalid configuration; carries every issue found, not only the first."""

    def __init__(self, issues: Iterable[Issue] | Issue | str):
        if isinstance(issues, str):
            issues = [Issue(issues)]
        elif isinstance(issues, Issue):
            issues = [issues]
        self.issues: list[Issue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def join_key(prefix: str, key: object) -> str:
    """Dotted key path; list indices as [i]."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: a message quotes what it refuses, never megabytes of it."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's text conversion limit
        return f"<an integer of {value.bit_length():,} bits>" if isinstance(value, int) else "<unprintable>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
