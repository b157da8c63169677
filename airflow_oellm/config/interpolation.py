"""Resolving OmegaConf interpolations in plain containers, fast, for the subset configs use.

OmegaConf needs ~15 ms per config here (it wraps every node and re-parses every interpolation);
a 1,000-point sweep must load in well under 2 s. This resolver handles node references
(`${a.b}`, `${.sibling}`, `${..up.x}`, `${a[0]}`), string concatenation, escapes (`\\${`), and
calls of the project's resolvers and `oc.env` with OmegaConf's argument rules. Anything else
raises `Unsupported`, and the caller falls back to OmegaConf itself. A differential test keeps
the two in agreement.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

Path = tuple[Any, ...]

_RESOLVER_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*:(.*)$", re.DOTALL)
_NODE_PATH = re.compile(r"^\s*(\.*)((?:[A-Za-z0-9_\-]+|\[\d+\])(?:\.[A-Za-z0-9_\-]+|\[\d+\])*)?\s*$")
_INT = re.compile(r"^[+-]?(?:0|[1-9][0-9_]*)$")
_FLOAT = re.compile(
    r"^[+-]?(?:(?:\d[\d_]*)?\.\d[\d_]*(?:[eE][+-]?\d+)?|\d[\d_]*[eE][+-]?\d+|\d[\d_]*\.(?:[eE][+-]?\d+)?|inf|nan)$",
    re.I,
)


_ENV_LIKE = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class Unsupported(Exception):
    """The construct is valid OmegaConf but outside this resolver's subset."""


class ResolveError(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def _env(key: Any, default: Any = ...) -> str | None:
    try:
        return os.environ[str(key)]
    except KeyError:
        if default is ...:
            raise KeyError(f"Environment variable '{key}' not found") from None
        return None if default is None else str(default)


def _key_text(path: Path) -> str:
    out = ""
    for p in path:
        out = f"{out}[{p}]" if isinstance(p, int) else (f"{out}.{p}" if out else str(p))
    return out


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside quotes and `${...}`."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif text.startswith("${", i):
            depth += 1
            i += 1
        elif c == "}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quote or depth:
        raise Unsupported(text)
    parts.append(text[start:])
    return parts


@functools.lru_cache(maxsize=8192)  # the same strings recur in every experiment of a sweep
def split_interpolations(text: str) -> tuple[tuple[bool, str], ...]:
    """[(is_interpolation, text)]: literal pieces (escapes applied) and `${...}` bodies."""
    parts: list[tuple[bool, str]] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            j = i
            while j < n and text[j] == "\\":
                j += 1
            if text.startswith("${", j):
                count = j - i
                buf.append("\\" * (count // 2))
                if count % 2:
                    buf.append("${")
                    i = j + 2
                    continue
                i = j
                continue
            buf.append(text[i:j])
            i = j
            continue
        if text.startswith("${", i):
            depth, quote, k = 1, "", i + 2
            while k < n and depth:
                ch = text[k]
                if quote:
                    if ch == "\\":
                        k += 1
                    elif ch == quote:
                        quote = ""
                elif ch in "'\"" and ":" in text[i + 2 : k]:
                    quote = ch
                elif text.startswith("${", k):
                    depth += 1
                    k += 1
                elif ch == "}":
                    depth -= 1
                k += 1
            if depth:
                raise Unsupported(text)
            if buf:
                parts.append((False, "".join(buf)))
                buf = []
            parts.append((True, text[i + 2 : k - 1]))
            i = k
            continue
        buf.append(c)
        i += 1
    if buf:
        parts.append((False, "".join(buf)))
    return tuple(parts)


def _primitive(text: str) -> Any:
    low = text.lower()
    if low == "null":
        return None
    if low in ("true", "false"):
        return low == "true"
    if _INT.match(text):
        try:
            return int(text.replace("_", ""))
        except ValueError:  # more digits than Python converts: no number a config means
            return text
    if _FLOAT.match(text):
        return float(text.replace("_", ""))
    return text


class InterpolationResolver:
    """Resolves every interpolation of one plain container (dicts, lists, scalars)."""

    def __init__(self, root: Mapping[str, Any], resolvers: Mapping[str, Callable[..., Any]]):
        self.root = root
        self.resolvers = {**resolvers, "oc.env": _env}
        self.memo: dict[Path, Any] = {}
        self.active: set[Path] = set()

    def resolve_all(self) -> dict[str, Any]:
        return self._container(self.root, ())

    def resolve_key(self, path: Path) -> Any:
        """One node, resolving only what it refers to."""
        try:
            node = self._node(path)
        except KeyError:
            raise ResolveError(_key_text(path), "key not found") from None
        return self._value(node, path)

    def _container(self, node: Any, path: Path) -> Any:
        if isinstance(node, Mapping):
            return {k: self._value(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._value(v, (*path, i)) for i, v in enumerate(node)]
        return node

    def _value(self, node: Any, path: Path) -> Any:
        if isinstance(node, str):
            if "${" not in node:
                return node
            return self._string_at(path, node)
        if isinstance(node, (Mapping, list)):
            return self._container(node, path)
        return node

    def _node(self, path: Path) -> Any:
        node: Any = self.root
        for p in path:
            if (isinstance(node, Mapping) and p in node) or (
                isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node)
            ):
                node = node[p]
            else:
                raise KeyError(p)
        return node

    def _string_at(self, path: Path, text: str) -> Any:
        if path in self.memo:
            return self.memo[path]
        if path in self.active:
            raise ResolveError(_key_text(path), "recursive interpolation detected")
        self.active.add(path)
        try:
            value = self._interpolate(text, path)
        finally:
            self.active.discard(path)
        self.memo[path] = value
        return value

    def _interpolate(self, text: str, path: Path) -> Any:
        parts = split_interpolations(text)
        if len(parts) == 1 and parts[0][0]:
            return self._evaluate(parts[0][1], path)
        return "".join(self._text(self._evaluate(body, path)) if interp else body for interp, body in parts)

    @staticmethod
    def _text(value: Any) -> str:
        if isinstance(value, (Mapping, list)):
            raise Unsupported("a container inside a string")  # OmegaConf prints it unresolved
        return str(value)

    def _evaluate(self, body: str, path: Path) -> Any:
        call = _RESOLVER_CALL.match(body)
        if call:
            name, raw_args = call.group(1), call.group(2)
            if name not in self.resolvers:
                raise Unsupported(name)
            args = [] if not raw_args.strip() else [self._argument(a, path) for a in _split_top(raw_args, ",")]
            try:
                return self.resolvers[name](*args)
            except (Unsupported, ResolveError):
                raise
            except Exception as exc:
                detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise ResolveError(_key_text(path), f"resolver '{name}' failed: {detail}") from None
        m = _NODE_PATH.match(body)
        if not m or not m.group(2):
            raise Unsupported(body)
        dots, rest = m.group(1), m.group(2)
        target: list[Any] = []
        for piece in re.findall(r"\[(\d+)\]|([^.\[\]]+)", rest):
            target.append(int(piece[0]) if piece[0] else piece[1])
        if dots:
            base = list(path[: len(path) - len(dots)])
            if len(dots) > len(path):
                raise ResolveError(_key_text(path), f"relative interpolation '{body.strip()}' goes above the root")
            target = base + target
        else:
            target = self._absolute(target)
        full = tuple(target)
        try:
            raw = self._node(full)
        except KeyError:
            hint = f" (for the job's shell variable write ${rest} or \\${{{rest}}})" if _ENV_LIKE.match(rest) else ""
            raise ResolveError(_key_text(path), f"interpolation key '{rest}' not found{hint}") from None
        return self._value(raw, full)

    def _absolute(self, target: list[Any]) -> list[Any]:
        # `a.0` addresses list items as well as `a[0]`
        out: list[Any] = []
        node: Any = self.root
        for p in target:
            if isinstance(node, list) and isinstance(p, str) and p.isdigit():
                p = int(p)
            out.append(p)
            node = node[p] if isinstance(node, (Mapping, list)) and self._has(node, p) else None
        return out

    @staticmethod
    def _has(node: Any, key: Any) -> bool:
        if isinstance(node, Mapping):
            return key in node
        return isinstance(key, int) and 0 <= key < len(node)

    def _argument(self, raw: str, path: Path) -> Any:
        text = raw.strip()
        if len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]:
            inner = re.sub(r"\\(['\"])", r"\1", text[1:-1])
            if "${" not in inner and "\\" not in inner:
                return inner
            return "".join(str(self._evaluate(b, path)) if i else b for i, b in split_interpolations(inner))
        if any(c in text for c in "[]{}'\"") and "${" not in text:
            raise Unsupported(text)
        if "${" in text:
            parts = split_interpolations(text)
            if len(parts) == 1 and parts[0][0]:
                return self._evaluate(parts[0][1], path)
            return "".join(str(self._evaluate(b, path)) if i else b for i, b in parts)
        return _primitive(text)


_SHELL_REFERENCE = re.compile(r"(?<!\\)\$\{([A-Za-z_][A-Za-z0-9_]*)(?=\}|:[-=+?])")


def protect_shell_references(value: Any, config_keys: set[str], resolver_names: set[str]) -> Any:
    """Escape `${NAME}` / `${NAME:-word}` that name neither a config section nor a resolver.

    An escaped `\\${...}` in a config means "not now": either a run-time config interpolation
    (`\\${timestring:}`, `\\${experiment.output_dir}`) or text for the job's shell
    (`\\${SLURM_JOB_ID}`). At run time the first kind is resolved and the second kept.
    """
    if isinstance(value, str):
        if "${" not in value:
            return value

        def escape(m: re.Match[str]) -> str:
            name = m.group(1)
            return m.group(0) if name in config_keys or name in resolver_names else "\\" + m.group(0)

        return _SHELL_REFERENCE.sub(escape, value)
    if isinstance(value, Mapping):
        return {k: protect_shell_references(v, config_keys, resolver_names) for k, v in value.items()}
    if isinstance(value, list):
        return [protect_shell_references(v, config_keys, resolver_names) for v in value]
    return value


def resolve(data: Mapping[str, Any], resolvers: Mapping[str, Callable[..., Any]]) -> dict[str, Any]:
    """A resolved copy of `data`. Raises ResolveError (with the key) or Unsupported."""
    return InterpolationResolver(data, resolvers).resolve_all()
