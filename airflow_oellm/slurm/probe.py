"""The facts platform detection needs from a login node, read with one shell command.

Which variables and paths to probe is the platform rules' business (config/platforms.py); this
module builds the command that prints them, safely quoted, and parses its output.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PlatformProbe:
    env: Mapping[str, str]
    hostname: str
    existing_paths: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> PlatformProbe:
        """Read the output of `probe_command`."""
        env: dict[str, str] = {}
        host = ""
        paths: set[str] = set()
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "HOST":
                host = rest.strip()
            elif kind == "ENV":
                name, _, value = rest.partition("=")
                if value:
                    env[name] = value
            elif kind == "PATH":
                paths.add(rest.strip())
        return cls(env=env, hostname=host, existing_paths=frozenset(paths))


def probe_command(env_names: Iterable[str], paths: Iterable[str]) -> str:
    """One shell command that prints the host name, these variables and which of these paths exist
    (no other variable leaks)."""
    names = " ".join(shlex.quote(v) for v in env_names)
    quoted_paths = " ".join(shlex.quote(p) for p in paths)
    return (
        'printf "HOST %s\\n" "$(hostname -f 2>/dev/null || hostname)"; '
        f'for v in {names}; do printf "ENV %s=%s\\n" "$v" "$(printenv "$v")"; done; '
        f'for p in {quoted_paths}; do [ -e "$p" ] && printf "PATH %s\\n" "$p"; done; true'
    )
