"""Mutation fuzz of the sweep loader and the override parser: whatever a sweep file or an override list
holds, `load_sweep`, `parse_overrides` and `apply_overrides` succeed or raise a ConfigError whose issues
say what is wrong (and, for a sweep file, in which file). Any other exception is an escape, a bug.

Sweep files: every example sweep (config/sweeps/*.yaml, and each of them with the sections it leaves to
the defaults written out: monitoring.log_events, platform.env, evaluation.suites, cooldowns, ...) gets
1-3 mutations of its plain data: the value at a random path (any key or list index, at any depth)
replaced by a hostile one (nested or empty containers, non-string keys, None, interpolations, escaped
ones, `???`, huge/negative/nan numbers, a 5,000-digit integer, expressions, a 10,000-character string),
a key deleted, an unknown key added, or a key of the schema set (creating its sections). The result is
written as YAML to a fresh temporary path and loaded over the repository's config groups.
Overrides: lists of hostile, malformed, random and valid overrides, applied to the unmodified example
sweeps through `load_sweep`, and to `parse_overrides`/`apply_overrides` alone.
A failure names the exception, its last frame in airflow_oellm and the (shrunk) input; the smallest
inputs found so far are also checked one by one (`test_the_escapes_found_so_far_...`).

Hypothesis runs derandomized (the same cases on every run of the same code and config files):
    .venv/bin/pytest tests/faults/test_fuzz_loader.py
To count escapes without stopping at the first one (cases, successes, ConfigErrors, escapes by
exception type and airflow_oellm file:line, with the smallest input seen for each):
    .venv/bin/python -m tests.faults.test_fuzz_loader [--cases N] [--quiet]
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import itertools
import math
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from airflow_oellm.config.compose import Composer, config_roots
from airflow_oellm.config.errors import ConfigError, Issue
from airflow_oellm.config.loader import load_sweep
from airflow_oellm.config.overrides import apply_overrides, parse_overrides
from airflow_oellm.config.schema import PROTECTED_SECTIONS, RootConfig
from airflow_oellm.config.validate import schema_fields
from airflow_oellm.config.yamlio import load_yaml
from tests.conftest import CONFIG, EXAMPLE_SWEEPS, REPO

pytestmark = [pytest.mark.faults, pytest.mark.config]

PACKAGE = REPO / "airflow_oellm"
FUZZ = settings(
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# cases per test (>= 2,000 in all): about 20 s together on a 2-core machine when nothing escapes
SWEEP_CASES = 1200
OVERRIDE_LOAD_CASES = 600
OVERRIDE_PARSE_CASES = 1000
ALL_CASES = SWEEP_CASES + OVERRIDE_LOAD_CASES + OVERRIDE_PARSE_CASES

# ---------------------------------------------------------------------------------------------------
# What the mutations put in. Simplest first: Hypothesis shrinks towards the start of each list.
LONG = "L" * 10_000


class Digits(str):
    """A YAML integer too long for Python's int/str conversion limit (4,300 digits)."""


DIGITS = Digits("1" * 5000)
# sweep filters and `${eval:...}` bodies: errors of the expression language and of big numbers
EXPRESSIONS: tuple[str, ...] = (
    "1/0",
    "-'a'",
    "int(1e400)",
    "round(1e400)",
    "index < 'a'",
    "len(1)",
    "min()",
    "lr +",
    "a\x00b",
    "-" * 3000 + "1",
)
BIG_RESULT = "10**4000 * 10**4000"  # an int with 8,001 digits: str() refuses it
VALUES: tuple[Any, ...] = (
    None,
    {},
    [],
    "",
    True,
    False,
    0,
    -1,
    1.5,
    -0.5,
    10**30,
    -(10**30),
    math.nan,
    math.inf,
    -math.inf,
    "???",
    "${x}",
    "${oc.env:NOPE}",
    "${vars.missing}",
    "$${x}",
    "\\${x}",
    "$${vars.missing}",
    "x$${oc.timestring:}y",
    "\\${oc.env:HOME}",
    "${eval:1/0}",
    "${eval:'1 +'}",
    "${platform_detect:}",
    "${",
    "${oc.timestring:}",
    "${oc.env:NOPE,null}",
    "${slurm.nodes}",
    "${backend.args}",
    "${vars.fuzz}",
    "${..x}",
    "${oc.create:'{a: 1}'}",
    "${oc.decode:'[1'}",
    "${oc.dict.keys:slurm}",
    "${pad_iter:-1}",
    "${slurmtime:abc}",
    f"${{eval:'{BIG_RESULT}'}}",
    f"x${{eval:'{BIG_RESULT}'}}",
    "${eval:" + "1" * 5000 + "}",
    *EXPRESSIONS,
    "n{index}",
    "a{99999999999}",
    "(" * 1200 + ")" * 1200,
    "../x",
    "a b/c",
    "-1",
    "ünïcødé ✓ 日本 \u202e",
    LONG,
    DIGITS,
    {"a": {"b": {"c": [1, {"d": None}]}}},
    {1: "one", False: "no", None: "null"},
    {"name": "x", "pattern": "(", "at": -1},
    {"type": "list", "configs": [{}]},
    [{}],
    [{"a": 1}, {"b": [2]}],
    [[1, [2, [3]]]],
    [None],
    ["${x}", "$${y}"],
    [1, "a", None],
)
# keys an "add" mutation adds to a mapping
ADD_KEYS: tuple[Any, ...] = (
    "bogus",
    "experiment",
    "class_name",
    "a.b",
    "",
    "${x}",
    "_self_",
    "name",
    "type",
    "axes",
    "configs",
    "defaults",
    "base_values",
    "filter",
    "sweep",
    "vars",
)
# sections the example sweeps leave to the defaults; the "+extras" variants write them out, so the
# mutations reach inside them
EXTRAS: dict[str, Any] = {
    "monitoring": {
        "poll_interval_seconds": 30,
        "inactivity_threshold_seconds": 900,
        "log_events": [
            {
                "name": "checkpoint",
                "pattern": r"saved checkpoint at iteration\s+(?P<iteration>\d+)",
                "extract_groups": {"checkpoint_iteration": "iteration"},
                "metadata": {"kind": "checkpoint"},
            },
            {"name": "nan", "pattern": "loss is nan", "pattern_type": "substring"},
        ],
    },
    "platform": {
        "env": {"FUZZ_VAR": "value"},
        "modules": ["gcc/12.2"],
        "setup": ["echo ready"],
        "container": {"runtime": "none", "binds": ["/a:/b"]},
    },
    "slurm": {"directives": {"mail-type": "END"}, "extra_directives": ["#SBATCH --comment=fuzz"], "exclude": ["n1"]},
    "srun": {"cpu_bind": "none", "args": {"overlap": True}},
    "restart": {"max_attempts": 2, "retry_delay_seconds": 10},
    "dag": {"tags": ["fuzz"], "params": ["slurm.time"], "start_date": "2026-01-01"},
    "conversion": {"resources": {"time": 600, "gpus_per_node": 0}},
    "evaluation": {
        "suites": [
            {"name": "quick", "when": "every", "tasks": ["perplexity"]},
            {"name": "full", "when": "interval", "every_iterations": 1000, "tasks": ["hellaswag"]},
        ]
    },
    "cooldowns": [
        {"at": 1000, "train": False, "suites": ["quick"]},
        {"at": 2000, "name": "cd_$${oc.timestring:}", "overrides": ["backend.args.lr=1.0e-5"]},
    ],
    "vars": {"fuzz": 1},
}

# ---------------------------------------------------------------------------------------------------
# Overrides
OVERRIDE_TEXTS: tuple[str, ...] = (
    "slurm.time=7200",
    "backend.args.lr=0.1",
    "+vars.y=3",
    "platform=lumi",
    "model=100M",
    "~backend.args.save",
    "++backend.args.foo=1",
    "slurm.nodes=2",
    "slurm.nodes=$${x}",
    "+vars.x=-1",
    "~backend",
    "backend.args.lr=[1,2",
    "=",
    "+",
    "++",
    "~",
    "a..b=1",
    "model=nope",
    "platform=../x",
    "platform=",
    "platform=null",
    "platform={a: 1}",
    "~platform",
    "monitoring=null",
    "backend=command",
    "sweep.axes.i=[1,2]",
    "project.name=${oc.env:X}",
    "slurm.time={a: 1}",
    "slurm.time={1: a}",
    "slurm.time=${eval:1/0}",
    "slurm.time=1e400",
    "slurm.nodes=10000000000000000000000000000000",
    "slurm.nodes=-1",
    "slurm.nodes=.nan",
    "slurm=null",
    "slurm={}",
    "slurm=[]",
    "slurm.nodes.x=1",
    "+slurm.nodes.x=1",
    "~slurm.nodes.x",
    "backend.args=[]",
    "backend.args.lr.x=1",
    "vars=1",
    "+vars={1: 2}",
    "sweep=[]",
    "sweep=null",
    "sweep.axes=null",
    "sweep.axes={a: 1}",
    "sweep.filter=1/0",
    "sweep.filter=[1]",
    "sweep.name=../x",
    "sweep.name_template={a}",
    "sweep.name_template=${x}",
    "++sweep.axes.model=[nope]",
    "++sweep.groups=[{type: list, configs: [1]}]",
    "monitoring.log_events=[{name: a, pattern: '('}]",
    "monitoring.log_events=[1]",
    "+monitoring.log_events=[{name: a, pattern: '(?P<g>x)', extract_groups: {f: h}}]",
    "cooldowns=[{at: x}]",
    "++cooldowns=[{at: 10, overrides: [1]}]",
    "evaluation.suites=[1]",
    "evaluation.suites=[{name: q, when: never}]",
    "platform.env={1: a}",
    "platform.env.A=${vars.missing}",
    "++platform.modules=[null]",
    "project.base_output_dir=relative",
    "project.base_output_dir=$${x}",
    "project.name=???",
    "project=null",
    "~project",
    "~project.name",
    "~sweep",
    "experiment.name=x",
    "+experiment=1",
    "defaults=[]",
    "+defaults=[]",
    "~defaults",
    "backend.args.lr=${vars.missing}",
    "backend.args.train_iters=$${x}",
    "backend.args.train_iters=-5",
    "dag.schedule={}",
    "restart.max_attempts=$${x}",
    "monitoring.poll_interval_seconds=$${x}",
    "platform=[a, b]",
    "model=[]",
    "platform=$${x}",
    "+sweep.name_template=${oc.env:NOPE,null}",
    "+sweep.name_template=${slurm.nodes}",
    "++sweep.filter=-'a'",
    "++sweep.filter=int(1e400)",
    "++sweep.filter=" + "-" * 3000 + "1",
    "++sweep.axes.bogus=[{a: 1}, {b: 2}]",
    f"+vars.big=x${{eval:'{BIG_RESULT}'}}",
    f"slurm.nodes=${{eval:'{BIG_RESULT}'}}",
    "+vars.d=${eval:" + "1" * 5000 + "}",
    "+vars.d=" + "1" * 5000,
)
OVERRIDE_PREFIXES = ("", "+", "++", "~")
WEIRD_KEYS = ("", "a..b", ".a", "a.", "1a", "a b", "${x}", "sweep.axes.backend.args.lr", "vars.x.y.z", "experiment")
VALUE_TEXTS: tuple[str, ...] = (
    "",
    "null",
    "[]",
    "{}",
    "???",
    "[1,2",
    "{a: 1}",
    "{1: a}",
    "{true: a}",
    "${x}",
    "$${x}",
    "\\${x}",
    "${oc.env:NOPE}",
    "${eval:1/0}",
    "${platform_detect:}",
    "1e400",
    "-1",
    ".nan",
    "10000000000000000000000000000000",
    "'quoted",
    "a: b: c",
    "[{a: [{}]}]",
    "- x",
    "&a [*a]",
    "!!python/object:os.system x",
    "${oc.env:NOPE,null}",
    "${slurm.nodes}",
    f"${{eval:'{BIG_RESULT}'}}",
    "1" * 5000,
    *EXPRESSIONS,
    LONG,
)
TEXT = st.characters(exclude_categories=("Cs",))
OVERRIDE_ALPHABET = st.one_of(st.sampled_from(list("abxyz_.=+~-${}[]:,'\" 019?\\\n")), TEXT)


def _dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _dotted_keys(v, key)


def _known_keys() -> tuple[str, ...]:
    """Dotted keys written in the repository's config files (sweeps and groups)."""
    keys: set[str] = set()
    for path in sorted(CONFIG.glob("*/*.yaml")):
        keys.update(_dotted_keys(yaml.safe_load(path.read_text()) or {}))
    keys.update(_dotted_keys(EXTRAS))
    return tuple(sorted(keys))


KNOWN_KEYS = _known_keys()


def _schema_keys(tp: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of the typed schema (into nested sections, not into lists of sections)."""
    for name, f in schema_fields(tp).items():
        if not prefix and name in PROTECTED_SECTIONS:
            continue
        yield (*prefix, name)
        if dataclasses.is_dataclass(f.type):
            yield from _schema_keys(f.type, (*prefix, name))


# a "set" mutation writes one of these into the file (creating its sections), so the mutations reach
# keys the example sweeps leave to the defaults (slurm.nodes, restart.max_attempts, ...)
SCHEMA_KEYS = (
    *_schema_keys(RootConfig),
    *(("sweep", k) for k in ("name", "name_template", "filter", "type", "axes", "base_values", "groups")),
    ("sweep", "axes", "bogus"),
    ("vars", "fuzz"),
)

# ---------------------------------------------------------------------------------------------------
# The sweeps to mutate, as plain data (read once)
BASES: dict[str, dict[str, Any]] = {}
for _path in EXAMPLE_SWEEPS:
    _data = yaml.safe_load(_path.read_text())
    BASES[_path.name] = _data
    BASES[f"{_path.name}+extras"] = {**copy.deepcopy(EXTRAS), **_data}

Path_ = tuple[Any, ...]


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Digits, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:int", str(value)))


def node_paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every mapping key and list index, at any depth, in document order."""
    paths: list[Path_] = []
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return paths
    for k, v in items:
        paths.append((*prefix, k))
        paths += node_paths(v, (*prefix, k))
    return paths


def _get(node: Any, path: Path_) -> Any:
    for part in path:
        node = node[part]
    return node


def show_path(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else f".{part}"
    return text.lstrip(".") or "<top>"


def show_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:40]}...{text[-10:]} ({len(text)} chars)"


@dataclass(frozen=True)
class SweepCase:
    example: str
    mutations: tuple[str, ...]
    document: dict[str, Any] = field(repr=False, compare=False)

    @property
    def source(self) -> Path:
        return CONFIG / "sweeps" / self.example.removesuffix("+extras")

    def yaml_text(self) -> str:
        return yaml.dump(self.document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)

    def __repr__(self) -> str:
        return f"SweepCase({self.example!r}, mutations={list(self.mutations)!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' falsifying-example printer
        printer.text(repr(self))

    def summary(self) -> str:
        return f"sweep {self.example} mutated by:\n  " + "\n  ".join(self.mutations)

    def describe(self) -> str:
        shown_text = "\n".join(
            line if len(line) <= 200 else line[:200] + " ..." for line in self.yaml_text().split("\n")
        )
        return f"{self.summary()}\nYAML written:\n{shown_text}"


def mutate(doc: dict[str, Any], choose: Callable[[str, tuple[Any, ...]], Any]) -> str:
    """One mutation of `doc` in place; `choose(label, options)` picks among options. Returns what it did."""
    paths = node_paths(doc)
    kind = choose("kind", ("replace", "replace", "replace", "set", "set", "delete", "add") if paths else ("set", "add"))
    if kind == "set":
        key = choose("schema key", SCHEMA_KEYS)
        value = copy.deepcopy(choose("value", VALUES))
        node = doc
        for part in key[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[key[-1]] = value
        return f"set {'.'.join(key)} = {show_value(value)}"
    if kind == "add":
        containers = [()] + [p for p in paths if isinstance(_get(doc, p), (dict, list)) and _get(doc, p) is not doc]
        where = choose("container", tuple(containers))
        value = copy.deepcopy(choose("value", VALUES))
        target = _get(doc, where)
        if isinstance(target, list):
            target.append(value)
            return f"append to {show_path(where)}: {show_value(value)}"
        key = choose("key", ADD_KEYS)
        target[key] = value
        return f"set {show_path((*where, key))} = {show_value(value)}"
    path = choose("path", tuple(paths))
    parent = _get(doc, path[:-1])
    if kind == "delete":
        del parent[path[-1]]
        return f"delete {show_path(path)}"
    value = copy.deepcopy(choose("value", VALUES))
    parent[path[-1]] = value
    return f"replace {show_path(path)} with {show_value(value)}"


@st.composite
def mutated_sweeps(draw: st.DrawFn) -> SweepCase:
    example = draw(st.sampled_from(sorted(BASES)), label="example")
    doc = copy.deepcopy(BASES[example])

    def choose(label: str, options: tuple[Any, ...]) -> Any:
        return draw(st.sampled_from(options), label=label)

    steps = tuple(mutate(doc, choose) for _ in range(draw(st.integers(1, 3), label="mutations")))
    return SweepCase(example, steps, doc)


structured_overrides = st.builds(
    lambda prefix, key, eq, value: f"{prefix}{key}{eq}{value}",
    st.sampled_from(OVERRIDE_PREFIXES),
    st.sampled_from(KNOWN_KEYS + WEIRD_KEYS),
    st.sampled_from(("=", "", " = ")),
    st.one_of(
        st.sampled_from(VALUE_TEXTS),
        st.sampled_from(VALUES).map(
            lambda v: yaml.dump(v, Dumper=_Dumper, default_flow_style=True, width=1_000_000).strip()
        ),
    ),
)
random_values = st.builds(
    lambda prefix, key, value: f"{prefix}{key}={value}",
    st.sampled_from(OVERRIDE_PREFIXES),
    st.sampled_from(KNOWN_KEYS),
    st.text(OVERRIDE_ALPHABET, max_size=30),
)
GROUPS = tuple(sorted(p.name for p in CONFIG.iterdir() if p.is_dir() and p.name != "sweeps"))
group_choices = st.builds(
    lambda prefix, group, value: f"{prefix}{group}={value}",
    st.sampled_from(OVERRIDE_PREFIXES),
    st.sampled_from(GROUPS),
    st.one_of(st.sampled_from(VALUE_TEXTS), st.sampled_from(tuple(p.stem for p in CONFIG.glob("*/*.yaml")))),
)
# random text alone rarely parses (and one bad override stops a list): it gets a smaller share
one_override = st.one_of(
    st.sampled_from(OVERRIDE_TEXTS),
    structured_overrides,
    st.sampled_from(OVERRIDE_TEXTS),
    structured_overrides,
    random_values,
    group_choices,
    st.text(OVERRIDE_ALPHABET, max_size=40),
)


@dataclass(frozen=True)
class Overrides:
    """An override list whose repr (in Hypothesis' falsifying examples) cuts long texts."""

    texts: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Overrides([{', '.join(show_value(t) for t in self.texts)}])"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


override_lists = st.lists(one_override, min_size=1, max_size=3).map(lambda texts: Overrides(tuple(texts)))


# ---------------------------------------------------------------------------------------------------
# Running one case and judging its outcome
class Scratch:
    """A fresh path for every mutated file: the YAML cache is keyed by (path, mtime, size)."""

    def __init__(self, root: Path):
        self.root = root
        self.counter = itertools.count()

    def write(self, case: SweepCase) -> Path:
        directory = self.root / str(next(self.counter))
        directory.mkdir(parents=True)
        path = directory / case.source.name  # same stem: the sweep's default name
        path.write_text(case.yaml_text(), encoding="utf-8")
        return path


@dataclass(frozen=True)
class Escape:
    exc_type: str
    site: str  # airflow_oellm file:line (function) of the last frame in the package
    innermost: str  # the very last frame (may be in a library)


def escape_of(exc: BaseException) -> Escape:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(PACKAGE)]
    site = "<no airflow_oellm frame>"
    if ours:
        f = ours[-1]
        site = f"{Path(f.filename).resolve().relative_to(REPO)}:{f.lineno} ({f.name})"
    last = frames[-1] if frames else None
    innermost = f"{last.filename}:{last.lineno} ({last.name})" if last else "<no frame>"
    return Escape(type(exc).__name__, site, innermost)


def issue_problems(exc: ConfigError, overrides: list[str] | None) -> list[str]:
    """What is wrong with a ConfigError's issues: none at all, an empty message, no file. An issue from
    a sweep file (`overrides` None) names a file, the sweep's or a group's; one from an override list
    names a file or the override's origin, or quotes the override (a malformed one has no key)."""
    if not exc.issues:
        return ["ConfigError without issues"]
    problems = []
    for issue in exc.issues:
        if not isinstance(issue, Issue):
            problems.append(f"not an Issue: {issue!r}")
        elif not isinstance(issue.message, str) or not issue.message.strip():
            problems.append(f"issue without a message: {issue!r}")
        elif not issue.file and (overrides is None or not any(repr(o)[:30] in issue.message for o in overrides)):
            problems.append(f"issue without a file{'' if overrides is None else ' or override'}: {issue!r}")
    return problems


def outcome(run: Callable[[], Any], overrides: list[str] | None) -> tuple[str, Any]:
    """('ok', None), ('config_error', ConfigError), ('bad_issue', (ConfigError, problems)) or ('escape', exc)."""
    try:
        run()
    except ConfigError as exc:
        problems = issue_problems(exc, overrides)
        return ("bad_issue", (exc, problems)) if problems else ("config_error", exc)
    except Exception as exc:  # anything else escaped the contract
        return "escape", exc
    return "ok", None


def check(run: Callable[[], Any], describe: Callable[[], str], overrides: list[str] | None) -> None:
    """Fail with the escape's type, its last airflow_oellm frame and the input, chained to the original
    exception (so Hypothesis keeps one minimal example per distinct escape site)."""
    kind, detail = outcome(run, overrides)
    if kind == "escape":
        e = escape_of(detail)
        raise AssertionError(
            f"{e.exc_type} escaped instead of ConfigError: {show_value(str(detail))}\n"
            f"  at {e.site}\n  innermost frame {e.innermost}\n{describe()}"
        ) from detail
    if kind == "bad_issue":
        _, problems = detail
        raise AssertionError("ConfigError with unusable issues:\n  " + "\n  ".join(problems) + f"\n{describe()}")


def load_mutated(scratch: Scratch, case: SweepCase) -> Callable[[], Any]:
    def run() -> Any:
        path = scratch.write(case)
        try:
            return load_sweep(path, config_dirs=[str(CONFIG)])
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    return run


def load_with_overrides(sweep: Path, overrides: list[str]) -> Callable[[], Any]:
    return lambda: load_sweep(sweep, overrides, config_dirs=[str(CONFIG)])


_COMPOSED: dict[Path, dict[str, Any]] = {}


def composed_data(sweep: Path) -> dict[str, Any]:
    """The example's composed (unresolved) config as plain data, composed once."""
    if sweep not in _COMPOSED:
        composer = Composer(config_roots(sweep, [str(CONFIG)]))
        _COMPOSED[sweep] = composer.compose(str(sweep), load_yaml(sweep)).data
    return _COMPOSED[sweep]


def parse_and_apply(sweep: Path, overrides: list[str]) -> Callable[[], Any]:
    def run() -> Any:
        parsed = parse_overrides(overrides)
        return apply_overrides(copy.deepcopy(composed_data(sweep)), parsed)

    return run


def describe_overrides(sweep: Path, overrides: list[str]) -> Callable[[], str]:
    return lambda: f"sweep {sweep.name} (unchanged) with overrides {[show_value(o) for o in overrides]}"


# ---------------------------------------------------------------------------------------------------
# The tests
@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("fuzz-sweeps"))


def test_the_unmutated_bases_load(scratch: Scratch) -> None:
    """The mutations start from valid sweeps (the "+extras" variants included)."""
    for example, doc in BASES.items():
        sweep = load_mutated(scratch, SweepCase(example, (), doc))()
        assert sweep.experiments, example


@settings(FUZZ, max_examples=SWEEP_CASES)
@given(case=mutated_sweeps())
def test_a_mutated_sweep_loads_or_raises_config_error_naming_the_file(scratch: Scratch, case: SweepCase) -> None:
    check(load_mutated(scratch, case), case.describe, None)


@settings(FUZZ, max_examples=OVERRIDE_LOAD_CASES)
@given(sweep=st.sampled_from(EXAMPLE_SWEEPS), overrides=override_lists)
def test_any_override_list_loads_or_raises_config_error(sweep: Path, overrides: Overrides) -> None:
    texts = list(overrides.texts)
    check(load_with_overrides(sweep, texts), describe_overrides(sweep, texts), texts)


@settings(FUZZ, max_examples=OVERRIDE_PARSE_CASES)
@given(sweep=st.sampled_from(EXAMPLE_SWEEPS), overrides=override_lists)
def test_any_override_list_parses_and_applies_or_raises_config_error(sweep: Path, overrides: Overrides) -> None:
    texts = list(overrides.texts)
    check(parse_and_apply(sweep, texts), describe_overrides(sweep, texts), texts)


# The smallest inputs found for each escape site (by this fuzz, or by probing around what it found),
# checked one by one so each site shows as its own failure: (id, sweep file text, overrides); a text
# that does not start with its own `defaults` gets HEAD in front.
HEAD = "defaults: [{platform: devcluster}]\nproject: {name: m, base_output_dir: /tmp/oellm-runs/m}\n"
AXES = "sweep: {axes: {backend.args.lr: [0.0003, 0.001]}}\n"
BIG_EVAL = f"\"${{eval:'{BIG_RESULT}'}}\""
FOUND: list[tuple[str, str, list[str]]] = [
    *(
        (f"{key}-escaped-interpolation", f"{key.split('.')[0]}: {{{key.split('.')[1]}: '$${{x}}'}}\n" + AXES, [])
        for key in (
            "slurm.nodes",
            "slurm.gpus_per_node",
            "slurm.ntasks_per_node",
            "slurm.cpus_per_task",
            "restart.max_attempts",
            "restart.retry_delay_seconds",
            "monitoring.poll_interval_seconds",
            "monitoring.inactivity_threshold_seconds",
            "platform.container",
        )
    ),
    *(
        (f"{section}-section-escaped", f"{section}: '$${{x}}'\n" + AXES, [])
        for section in ("slurm", "restart", "monitoring")
    ),
    ("log-event-escaped", "monitoring: {log_events: ['$${x}']}\n" + AXES, []),
    (
        "log-event-extract-groups-escaped",
        "monitoring: {log_events: [{name: a, pattern: '(?P<g>x)', extract_groups: '$${x}'}]}\n" + AXES,
        [],
    ),
    (
        "log-event-regex-too-deep",
        f"monitoring: {{log_events: [{{name: a, pattern: '{'(' * 1200}{')' * 1200}'}}]}}\n" + AXES,
        [],
    ),
    (
        "log-event-regex-repeat-too-large",
        "monitoring: {log_events: [{name: a, pattern: 'a{99999999999}'}]}\n" + AXES,
        [],
    ),
    ("platform-interpolated-string", "platform: '${vars.missing}'\n" + AXES, []),
    ("override-slurm.nodes-escaped", AXES, ["slurm.nodes=$${x}"]),
    ("override-group-option-list", AXES, ["platform=[a, b]"]),
    ("override-group-option-too-long", AXES, ["backend=" + "L" * 300]),
    ("defaults-entry-too-long", HEAD.replace("local}]", "local}, " + "L" * 300 + "]") + AXES, []),
    ("name-template-int", AXES, ["+sweep.name_template=${slurm.nodes}"]),
    ("name-template-null", AXES, ["+sweep.name_template=${oc.env:NOPE,null}"]),
    ("name-template-mapping", AXES, ["+sweep.name_template=${slurm}"]),
    ("name-template-omegaconf-list", AXES, ["+sweep.name_template=${oc.dict.keys:slurm}"]),
    ("filter-unary-minus-on-text", AXES, ["++sweep.filter=-'a'"]),
    ("filter-int-of-infinity", AXES, ["++sweep.filter=int(1e400)"]),
    ("filter-too-deep", AXES, ["++sweep.filter=" + "-" * 3000 + "1"]),
    ("eval-of-5000-digits", "vars: {big: '${eval:" + "1" * 5000 + "}'}\n" + AXES, []),
    ("yaml-int-of-5000-digits", "vars: {big: " + "1" * 5000 + "}\n" + AXES, []),
    ("8001-digit-int-inside-a-string", f"vars: {{big: \"x${{eval:'{BIG_RESULT}'}}\"}}\n" + AXES, []),
    ("8001-digit-int-in-slurm.nodes", f"slurm: {{nodes: {BIG_EVAL}}}\n" + AXES, []),
    ("8001-digit-int-in-a-directive", f"slurm: {{directives: {{mail-type: {BIG_EVAL}}}}}\n" + AXES, []),
    ("8001-digit-int-as-a-section", f"dag: {BIG_EVAL}\n" + AXES, []),
    ("8001-digit-int-in-a-string-field", f"platform: {{description: {BIG_EVAL}}}\n" + AXES, []),
    ("8001-digit-int-in-a-choice-field", f"conversion: {{model_type: {BIG_EVAL}}}\n" + AXES, []),
    ("8001-digit-int-as-train-iters", f"backend: {{args: {{train_iters: {BIG_EVAL}}}}}\n" + AXES, []),
    ("5000-digit-text-as-train-iters", "backend: {args: {train_iters: '" + "1" * 5000 + "'}}\n" + AXES, []),
    ("8001-digit-int-as-a-group-option", AXES, [f"platform={BIG_EVAL[1:-1]}"]),
    ("inert-axis-of-mappings", "sweep: {name_template: 'n{index}', axes: {bogus: [{a: 1}, {b: 2}]}}\n", []),
    ("no-project-section", "defaults: [{platform: devcluster}]\n" + AXES, []),
    ("axis-under-an-unknown-section", "sweep: {axes: {a.b: [1, 2]}}\n", []),
]


@pytest.mark.parametrize(("text", "overrides"), [pytest.param(t, o, id=i) for i, t, o in FOUND])
def test_the_escapes_found_so_far_load_or_raise_config_error(tmp_path: Path, text: str, overrides: list[str]) -> None:
    path = tmp_path / "config" / "sweeps" / "m.yaml"
    path.parent.mkdir(parents=True)
    full = text if text.startswith("defaults") else HEAD + text
    path.write_text(full, encoding="utf-8")

    def describe() -> str:
        shown_file = show_value(full) if len(full) > 400 else full
        return f"sweep file:\n{shown_file}\noverrides {[show_value(o) for o in overrides]}"

    check(lambda: load_sweep(path, overrides, config_dirs=[str(CONFIG)]), describe, overrides or None)


# ---------------------------------------------------------------------------------------------------
# Measurement: every case runs, escapes are counted by (type, airflow_oellm file:line)
@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    config_errors: int = 0
    bad_issues: collections.Counter[str] = field(default_factory=collections.Counter)
    issues_without_file: int = 0
    issues: int = 0
    escapes: collections.Counter[Escape] = field(default_factory=collections.Counter)
    examples: dict[Escape, tuple[tuple[int, int], str]] = field(default_factory=dict)
    bad_examples: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)

    def record(
        self, run: Callable[[], Any], summary: Callable[[], str], overrides: list[str] | None, size: int
    ) -> None:
        """`size`: mutations or overrides in the case (the example kept per escape site is the smallest)."""
        self.cases += 1
        kind, detail = outcome(run, overrides)
        if kind == "ok":
            self.ok += 1
        elif kind == "escape":
            e = escape_of(detail)
            self.escapes[e] += 1
            text = f"{summary()}\n  -> {type(detail).__name__}: {show_value(str(detail))}"
            rank = (size, len(text))
            if e not in self.examples or rank < self.examples[e][0]:
                self.examples[e] = (rank, text)
        else:
            exc = detail[0] if kind == "bad_issue" else detail
            self.config_errors += 1
            self.issues += len(exc.issues)
            self.issues_without_file += sum(1 for i in exc.issues if not i.file)
            if kind == "bad_issue":
                for problem in detail[1]:
                    what = problem.split(":")[0]
                    self.bad_issues[what] += 1
                    rank = (size, len(problem))
                    if what not in self.bad_examples or rank < self.bad_examples[what][0]:
                        self.bad_examples[what] = (rank, f"{summary()}\n  -> {problem}")

    def report(self, title: str) -> str:
        escaped = sum(self.escapes.values())
        lines = [
            f"== {title}: {self.cases} cases, {self.ok} loaded, {self.config_errors} ConfigError, "
            f"{escaped} escapes ({100 * escaped / max(self.cases, 1):.1f} %) at {len(self.escapes)} sites; "
            f"ConfigError issues: {self.issues}, without a file: {self.issues_without_file}",
        ]
        lines += [f"   bad issues: {n} x {what}" for what, n in self.bad_issues.most_common()]
        for e, n in self.escapes.most_common():
            lines.append(f"   {n:5d} x {e.exc_type} at {e.site}  [innermost {e.innermost}]")
        return "\n".join(lines)


def measure(cases: int, show_examples: bool = True) -> list[Tally]:
    """Run `cases` cases (split like the tests'), print the counts and the smallest input per escape site."""
    generate = settings(FUZZ, phases=[Phase.generate], max_examples=cases, report_multiple_bugs=False)
    sweep_share = round(cases * SWEEP_CASES / ALL_CASES)
    load_share = round(cases * OVERRIDE_LOAD_CASES / ALL_CASES)
    parse_share = cases - sweep_share - load_share
    tallies = {name: Tally() for name in ("mutated sweeps", "overrides via load_sweep", "overrides parsed+applied")}
    with tempfile.TemporaryDirectory(prefix="oellm-fuzz-") as root:
        scratch_dir = Scratch(Path(root))

        @settings(generate, max_examples=sweep_share)
        @given(case=mutated_sweeps())
        def sweeps(case: SweepCase) -> None:
            tallies["mutated sweeps"].record(load_mutated(scratch_dir, case), case.summary, None, len(case.mutations))

        @settings(generate, max_examples=load_share)
        @given(sweep=st.sampled_from(EXAMPLE_SWEEPS), overrides=override_lists)
        def loads(sweep: Path, overrides: Overrides) -> None:
            texts = list(overrides.texts)
            tallies["overrides via load_sweep"].record(
                load_with_overrides(sweep, texts), describe_overrides(sweep, texts), texts, len(texts)
            )

        @settings(generate, max_examples=parse_share)
        @given(sweep=st.sampled_from(EXAMPLE_SWEEPS), overrides=override_lists)
        def parses(sweep: Path, overrides: Overrides) -> None:
            texts = list(overrides.texts)
            tallies["overrides parsed+applied"].record(
                parse_and_apply(sweep, texts), describe_overrides(sweep, texts), texts, len(texts)
            )

        for name, fn in zip(tallies, (sweeps, loads, parses), strict=True):
            start = time.perf_counter()
            fn()
            print(f"{tallies[name].report(name)}\n   ({time.perf_counter() - start:.1f} s)")
            for e, (_, text) in tallies[name].examples.items() if show_examples else ():
                print(f"\n   -- smallest input for {e.exc_type} at {e.site}:\n" + _indent(text, "      "))
            for problem, (_, text) in tallies[name].bad_examples.items() if show_examples else ():
                print(f"\n   -- smallest input for a ConfigError with {problem}:\n" + _indent(text, "      "))
            print()
    total = Tally()
    for t in tallies.values():
        total.cases += t.cases
        total.ok += t.ok
        total.config_errors += t.config_errors
        total.issues += t.issues
        total.issues_without_file += t.issues_without_file
        total.bad_issues.update(t.bad_issues)
        total.escapes.update(t.escapes)
    print(total.report("all"))
    return list(tallies.values())


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=ALL_CASES, help="cases in all (split like the tests')")
    parser.add_argument("--quiet", action="store_true", help="counts only, no example inputs")
    args = parser.parse_args()
    measure(args.cases, show_examples=not args.quiet)
