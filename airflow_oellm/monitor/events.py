"""Log events: regexes (or substrings) matched on every new line of a job's log.

The seed guide's format: `name`, `pattern`, `pattern_type`, `extract_groups` (event field ->
regex group) and static `metadata`. Built-in Megatron events (megatron/logs.py) come first and
need no configuration. The matcher consumes raw bytes as they arrive, keeps the unfinished last
line, and numbers lines and byte offsets, so a restart from a saved state neither misses nor
repeats an event.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_oellm.megatron.logs import BUILTIN_EVENTS, iteration_fields

MAX_LINE_BYTES = 64 * 1024
_INT = re.compile(r"^[-+]?\d+$")
_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


def typed(value: str) -> Any:
    """Numbers in matched groups become numbers (`iteration >= 50000` must compare numerically)."""
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    return value


@dataclass(frozen=True)
class EventSpec:
    name: str
    pattern: str
    pattern_type: str = "regex"
    extract_groups: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    builtin: bool = False

    def __post_init__(self) -> None:
        if self.pattern_type == "regex":
            object.__setattr__(self, "_regex", re.compile(self.pattern))

    def match(self, line: str) -> dict[str, Any] | None:
        if self.pattern_type == "substring":
            return {} if self.pattern in line else None
        m = self._regex.search(line)  # type: ignore[attr-defined]
        if m is None:
            return None
        groups = {k: typed(v) for k, v in m.groupdict().items() if v is not None}
        for target, group in self.extract_groups.items():
            if group in groups:
                groups[target] = groups[group]
        if self.name == "iteration" and self.builtin:
            groups.update(iteration_fields(line))
        return groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pattern": self.pattern,
            "pattern_type": self.pattern_type,
            "extract_groups": dict(self.extract_groups),
            "metadata": dict(self.metadata),
            "builtin": self.builtin,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EventSpec:
        return cls(
            data["name"],
            data["pattern"],
            data.get("pattern_type", "regex"),
            dict(data.get("extract_groups") or {}),
            dict(data.get("metadata") or {}),
            bool(data.get("builtin")),
        )


def builtin_specs() -> list[EventSpec]:
    return [EventSpec(name, pattern, metadata=metadata, builtin=True) for name, pattern, metadata in BUILTIN_EVENTS]


def event_specs(configured: Iterable[Mapping[str, Any]] = (), *, builtins: bool = True) -> list[EventSpec]:
    """Built-in events first, then the configured ones (a configured name replaces a built-in)."""
    user = [EventSpec.from_dict(c) for c in configured]
    names = {s.name for s in user}
    return [s for s in (builtin_specs() if builtins else []) if s.name not in names] + user


@dataclass(frozen=True)
class Event:
    name: str
    groups: dict[str, Any]
    metadata: dict[str, Any]
    line: str
    line_no: int  # 1-based, in the whole log
    offset: int  # byte offset of the line's start

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "groups": self.groups,
            "metadata": self.metadata,
            "line": self.line,
            "line_no": self.line_no,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            data["name"],
            dict(data["groups"]),
            dict(data.get("metadata") or {}),
            data["line"],
            int(data["line_no"]),
            int(data["offset"]),
        )


class EventMatcher:
    """Feeds log bytes in order; returns complete lines and the events they hold."""

    def __init__(
        self,
        specs: Sequence[EventSpec],
        *,
        offset: int = 0,
        line_no: int = 0,
        partial: bytes = b"",
        mid_line: bool = False,
    ):
        self.specs = list(specs)
        self.offset = offset  # bytes consumed, the partial line included
        self.line_no = line_no  # complete lines so far (counted from a skip on, after one)
        self.partial = partial
        self.mid_line = mid_line  # after a skip: the bytes up to the next newline are a line's rest

    def state(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "line_no": self.line_no,
            "partial": base64.b64encode(self.partial).decode(),
            "mid_line": self.mid_line,
        }

    @classmethod
    def from_state(cls, specs: Sequence[EventSpec], state: Mapping[str, Any] | None) -> EventMatcher:
        state = state or {}
        return cls(
            specs,
            offset=int(state.get("offset", 0)),
            line_no=int(state.get("line_no", 0)),
            partial=base64.b64decode(state.get("partial", "") or ""),
            mid_line=bool(state.get("mid_line", False)),
        )

    def skip_to(self, offset: int) -> int:
        """Go on reading at `offset` (ahead), leaving the bytes between unread; returns how many."""
        skipped = offset - self.offset + len(self.partial)
        self.offset, self.partial, self.mid_line = offset, b"", True
        return skipped

    def feed(self, data: bytes, *, final: bool = False) -> tuple[list[str], list[Event]]:
        """New complete lines (decoded; invalid UTF-8 replaced) and the events they hold.

        `final`: the log is finished, so an unterminated last line counts too.
        """
        start = self.offset - len(self.partial)
        buffer = self.partial + data
        self.offset += len(data)
        lines: list[str] = []
        events: list[Event] = []
        pos = 0
        if self.mid_line:  # the rest of a line that a skip cut: not a line of its own
            newline = buffer.find(b"\n")
            if newline < 0 and not final:
                self.partial = b""
                return lines, events
            pos, self.mid_line = (newline + 1 if newline >= 0 else len(buffer)), False
        while pos < len(buffer):
            newline = buffer.find(b"\n", pos)
            if newline >= 0:
                end, following = newline, newline + 1
            elif len(buffer) - pos > MAX_LINE_BYTES:  # an endless line: cut it, keep memory bounded
                end = following = pos + MAX_LINE_BYTES
            elif final:
                end = following = len(buffer)
            else:
                break
            self.line_no += 1
            text = buffer[pos : min(end, pos + MAX_LINE_BYTES)].decode("utf-8", errors="replace").rstrip("\r")
            lines.append(text)
            events.extend(self._match(text, start + pos))
            pos = following
        self.partial = buffer[pos:]
        return lines, events

    def _match(self, text: str, offset: int) -> Iterable[Event]:
        for spec in self.specs:
            groups = spec.match(text)
            if groups is not None:
                yield Event(spec.name, groups, dict(spec.metadata), text, self.line_no, offset)


def match_log(data: bytes, specs: Sequence[EventSpec]) -> list[Event]:
    """Every event in a whole log (for `airflow-oellm events`)."""
    _, events = EventMatcher(specs).feed(data, final=True)
    return events
