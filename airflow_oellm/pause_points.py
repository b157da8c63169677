"""Named points where fault-injection tests stop a process, to kill it at the worst moment.

With `OELLM_PAUSE_AT=<point>[,<point>...]:<directory>`, a test arms a pause for a key (a DAG id) by creating
`<directory>/<point>.<key>.armed`. The first process that reaches `<point>` for an armed key creates
`<directory>/<point>.<key>` (holding its pid) and waits until `<that file>.release` exists; later
arrivals pass. Unset (always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

ENV = "OELLM_PAUSE_AT"
MAX_PAUSE_SECONDS = 3600.0


def flag_path(directory: str | os.PathLike[str], point: str, key: str) -> Path:
    return Path(directory) / f"{point}.{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}"


def pause_point(point: str, key: str) -> None:
    wanted, _, directory = os.environ.get(ENV, "").partition(":")
    if point not in wanted.split(",") or not directory:
        return
    flag = flag_path(directory, point, key)
    if not flag.with_name(flag.name + ".armed").exists():
        return
    try:
        with open(flag, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return
    release = flag.with_name(flag.name + ".release")
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
