"""What a submitted job asks for: sbatch options from the command line and `#SBATCH` lines, parsed.

Pure: no files are read here except by the caller. Options that only matter to a real cluster
(partition, account, GPUs, memory, ...) are accepted and ignored; what cannot be honoured on one
machine (several nodes, arrays, dependencies) is refused with SLURM-like messages.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from airflow_oellm.slurm.timespec import parse_slurm_time

SBATCH_SHORT = {
    "J": "job-name",
    "o": "output",
    "e": "error",
    "t": "time",
    "D": "chdir",
    "c": "cpus-per-task",
    "n": "ntasks",
    "N": "nodes",
    "x": "exclude",
    "a": "array",
    "d": "dependency",
    "p": "partition",
    "A": "account",
    "q": "qos",
    "G": "gpus",
    "w": "nodelist",
}
SBATCH_FLAGS = frozenset(
    {
        "parsable",
        "exclusive",
        "requeue",
        "no-requeue",
        "hold",
        "wait",
        "test-only",
        "overcommit",
        "contiguous",
        "spread-job",
        "use-min-nodes",
        "quiet",
        "verbose",
        "get-user-env",
    }
)
_REFUSED = {
    "array": "job arrays",
    "dependency": "job dependencies",
    "hold": "held jobs",
    "wait": "--wait",
    "test-only": "--test-only",
}
_SIGNAL = re.compile(r"^(?P<batch>B:)?(?P<sig>[A-Z0-9]+)(?:@(?P<secs>\d+))?$")


class SubmitError(ValueError):
    """sbatch refused the job; the message is what sbatch prints after `sbatch: error: `."""


@dataclass(frozen=True)
class JobSpec:
    script: str
    name: str
    output: str
    error: str | None
    workdir: str
    time_limit: int | None  # seconds; None: unlimited
    warn_signal: str | None  # `--signal`: sent `warn_seconds` before the time limit
    warn_seconds: int
    warn_batch_only: bool
    ntasks: int
    cpus: int  # for all tasks
    comment: str | None
    open_mode: str  # append | truncate
    exclude: tuple[str, ...]


def directives(script_text: str) -> list[str]:
    """Options from the `#SBATCH` lines before the first command, as sbatch reads them."""
    options: list[str] = []
    for line in script_text.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            options += shlex.split(stripped[len("#SBATCH") :], comments=True)
        elif stripped and not stripped.startswith("#"):
            break
    return options


def parse_options(
    argv: Sequence[str], short: Mapping[str, str] = SBATCH_SHORT, flags: frozenset[str] = SBATCH_FLAGS
) -> tuple[dict[str, str], list[str]]:
    """`--name=value`, `--name value`, `-Xvalue`, `-X value`, `-XY` (flags) → {long name: value}; the
    words from the first non-option on (the script and its arguments) are returned apart."""
    options: dict[str, str] = {}
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--" or not word.startswith("-") or word == "-":
            return options, words[i + 1 :] if word == "--" else words[i:]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if not eq and name not in flags:
                if i + 1 >= len(words):
                    raise SubmitError(f"option '--{name}' requires an argument")
                i += 1
                value = words[i]
        else:
            letter = word[1]
            if letter not in short:
                raise SubmitError(f"invalid option -- '{letter}'")
            name, value = short[letter], word[2:]
            if name in flags:
                options[name] = ""
                if value:  # more flags in the same word: -XDnP
                    words[i] = f"-{value}"
                    continue
                i += 1
                continue
            if not value:
                if i + 1 >= len(words):
                    raise SubmitError(f"option requires an argument -- '{letter}'")
                i += 1
                value = words[i]
        options[name] = value
        i += 1
    return options, []


def job_spec(
    script_path: str, script_text: str, argv_options: dict[str, str], submit_dir: str, cpus_available: int
) -> JobSpec:
    """The job's settings: command-line options over `#SBATCH` lines over sbatch's defaults."""
    if not script_text.startswith("#!"):
        raise SubmitError(
            "This does not look like a batch script.  The first line must start with #! followed by "
            "the path to an interpreter."
        )
    from_script, _ = parse_options(directives(script_text))
    opts = {**from_script, **argv_options}
    for name, what in _REFUSED.items():
        if name in opts:
            raise SubmitError(f"{what} are not supported by the local-process batch system")
    nodes = opts.get("nodes", "1")
    if nodes.split("-")[0] != "1":
        raise SubmitError(f"--nodes={nodes}: the local-process batch system runs every job on this one machine")
    try:
        ntasks = int(opts.get("ntasks", opts.get("ntasks-per-node", "1")))
        cpus = int(opts.get("cpus-per-task", "1")) * ntasks
        time_limit = parse_slurm_time(opts["time"]) if "time" in opts else None
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
    if cpus > cpus_available:
        raise SubmitError(
            f"Requested node configuration is not available ({cpus} CPUs asked, {cpus_available} on this machine)"
        )
    warn_signal, warn_seconds, batch_only = None, 0, False
    if "signal" in opts:
        m = _SIGNAL.match(opts["signal"].upper().replace("SIG", "") if opts["signal"] else "")
        if not m:
            raise SubmitError(f"Invalid --signal specification {opts['signal']!r}")
        warn_signal, warn_seconds, batch_only = m["sig"], int(m["secs"] or 60), bool(m["batch"])
    exclude = tuple(n for n in opts.get("exclude", "").split(",") if n)
    open_mode = opts.get("open-mode", "truncate")
    if open_mode not in ("append", "truncate"):
        raise SubmitError(f"Invalid --open-mode={open_mode!r}")
    workdir = opts.get("chdir", submit_dir)
    return JobSpec(
        script=script_path,
        name=opts.get("job-name", script_path.rsplit("/", 1)[-1]),
        output=opts.get("output", "slurm-%j.out"),
        error=opts.get("error"),
        workdir=workdir,
        time_limit=time_limit,
        warn_signal=warn_signal,
        warn_seconds=warn_seconds,
        warn_batch_only=batch_only,
        ntasks=ntasks,
        cpus=cpus,
        comment=opts.get("comment"),
        open_mode=open_mode,
        exclude=exclude,
    )


def expand_path(pattern: str, *, job_id: str, name: str, user: str, node: str, workdir: str) -> str:
    """sbatch's filename patterns (%j %x %u %N %A %a %%), relative to the working directory."""
    values = {
        "j": job_id,
        "J": job_id,
        "x": name,
        "u": user,
        "N": node,
        "n": "0",
        "t": "0",
        "A": job_id,
        "a": "4294967294",
        "%": "%",
    }
    path = re.sub(r"%(\d*)([jJxuNntAa%])", lambda m: values[m[2]].zfill(int(m[1] or 0)), pattern)
    return path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
