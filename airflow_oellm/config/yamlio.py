"""Reading config YAML: OmegaConf's loader, plain containers, escapes, and line lookup for errors."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from airflow_oellm.config.errors import ConfigError, Issue

# Sweep files are trusted local files and a 1,000-point sweep has more than OmegaConf's
# default 10,000 nodes; the alias-expansion ratio check stays on against alias bombs.
MAX_YAML_NODES = 5_000_000

# `$${...}` is the seed guide's spelling of an escaped interpolation; OmegaConf's is `\${...}`.
_DOUBLE_DOLLAR = re.compile(r"\$\$\{")


def unescape_double_dollar(value: Any) -> Any:
    """Rewrite `$${` to OmegaConf's escape `\\${` in every string of a container."""
    if isinstance(value, str):
        return _DOUBLE_DOLLAR.sub(r"\\${", value) if "$${" in value else value
    if isinstance(value, dict):
        return {k: unescape_double_dollar(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape_double_dollar(v) for v in value]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping as plain Python containers (interpolations left unresolved).

    Cached by modification time and size; callers must not mutate the result.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(Issue("file not found", file=str(path))) from None
    return _load_cached(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=1)
def _loader() -> Any:
    # OmegaConf's own YAML rules (floats like 1e-4, no timestamps, duplicate keys and alias
    # bombs refused) without building a DictConfig, which costs ~0.4 s for a 1,000-point sweep.
    from omegaconf._yaml import get_yaml_loader

    return get_yaml_loader(max_yaml_expanded_nodes=MAX_YAML_NODES)


@lru_cache(maxsize=512)
def _load_cached(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_loader())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise ConfigError(Issue(f"invalid YAML: {problem}", file=path, line=line)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(Issue(f"invalid YAML: {exc}", file=path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(Issue(f"not UTF-8 text: {exc.reason}", file=path)) from None
    except ValueError as exc:  # PyYAML's int() of a number with more digits than Python converts
        raise ConfigError(Issue(f"invalid YAML: {exc}", file=path)) from None
    except IsADirectoryError:
        raise ConfigError(Issue("is a directory, not a YAML file", file=path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(Issue(f"top level must be a mapping, got a {type(data).__name__}", file=path))
    bad_keys = _non_string_keys(data, "")
    if bad_keys:
        key, value = bad_keys[0]
        raise ConfigError(Issue(f"keys must be strings, got {value!r}", key, path, key_line(path, key)))
    return unescape_double_dollar(data)


def _non_string_keys(node: Any, prefix: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                found.append((prefix, k))
            else:
                found += _non_string_keys(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _non_string_keys(v, f"{prefix}[{i}]")
    return found


def key_line(path: str | os.PathLike[str] | None, key: str) -> int | None:
    """Line (1-based) where a dotted key path is written in a YAML file, if it can be found.

    Keys that contain dots themselves (sweep axes such as `backend.args.lr`) are matched too.
    Used only when reporting an error, so it re-reads the file.
    """
    if not path or not key:
        return None
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key) if p]
    node, best = root, None
    i = 0
    while node is not None and i < len(parts):
        if isinstance(node, yaml.MappingNode):
            found = None
            # longest literal key first, so "backend.args.lr" beats "backend"
            for j in range(len(parts), i, -1):
                want = ".".join(parts[i:j])
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == want:
                        found = (k, v, j)
                        break
                if found:
                    break
            if not found:
                break
            k, node, i = found
            best = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and parts[i].isdigit():
            idx = int(parts[i])
            if idx >= len(node.value):
                break
            node = node.value[idx]
            best = node.start_mark.line + 1
            i += 1
        else:
            break
    return best
