"""The package's layers, read from its imports (every import, lazy ones included): no cycle between
packages, every import points down, and nothing below the line can reach Airflow.

docs/architecture.md prints the same table; a test here keeps the two equal.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "airflow_oellm"

# unit -> rank; an import must go to a unit of strictly lower rank. A new package must be placed here.
RANK: dict[str, int] = {
    "(root)": 0,
    "megatron": 0,
    "evaluation": 0,
    "pause_points": 0,
    "deprecation": 0,
    "notifications": 0,
    "slurm": 1,
    "config": 2,
    "localjobs": 2,
    "monitor": 3,
    "jobscript": 3,
    "hooks": 4,
    "analysis": 4,
    "triggers": 5,
    "links": 5,
    "sensors": 6,
    "operators": 6,
    "dag_factory": 7,
    "dashboard": 7,
    "plugins": 8,
    "cli": 8,
    "get_provider_info": 8,
}
# Below the line: plain Python, no Airflow, reachable without it (the CLI included).
AIRFLOW_FREE_UNITS = frozenset({"(root)", "megatron", "evaluation", "pause_points", "deprecation", "slurm", "config"})
AIRFLOW_FREE_UNITS |= {"notifications"}
AIRFLOW_FREE_UNITS |= {"localjobs"}
AIRFLOW_FREE_UNITS |= {"monitor", "jobscript", "cli"}
AIRFLOW_FREE_UNITS |= {"analysis"}
AIRFLOW_FREE_MODULES = frozenset(f"airflow_oellm.dashboard.{name}" for name in ("model", "plot", "urls"))
WEB_AND_DB = ("airflow", "sqlalchemy", "fastapi", "starlette")

# Cycles that exist today, each to be removed by its own change. A listed cycle that is gone fails too,
# so the list only shrinks.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports, at any depth, as (dotted name, line); `from pkg import sub` names `pkg.sub`."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            found.append((source, node.lineno))
            found += [
                (f"{source}.{alias.name}", node.lineno) for alias in node.names if is_module(f"{source}.{alias.name}")
            ]
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> where, as file:line."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in package_modules().items():
        for name, line in imports(path):
            if name.split(".")[0] != "airflow_oellm":
                continue
            source, target = unit(module), unit(name)
            if source != target and target != "(root)":
                edges[source, target].append(f"{path.relative_to(REPO)}:{line}")
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one unit (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: frozenset[str], edges: dict[tuple[str, str], list[str]]) -> str:
    inside = [f"{s} -> {t} ({', '.join(w[:3])})" for (s, t), w in sorted(edges.items()) if {s, t} <= component]
    return "; ".join(inside)


def test_no_cycle_between_packages():
    edges = unit_edges()
    found = cycles(edges)
    new = [describe(c, edges) for c in found if c not in KNOWN_CYCLES]
    assert new == [], "import cycles between packages"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert gone == [], "a known cycle is gone: delete it from KNOWN_CYCLES"


def test_every_unit_has_a_rank():
    units = {unit(m) for m in package_modules()}
    assert units - RANK.keys() == set(), "place the new package in RANK (and docs/architecture.md)"
    assert RANK.keys() - units == set(), "RANK names a package that does not exist"


def test_every_import_points_down():
    upward = [
        f"{s} ({RANK[s]}) -> {t} ({RANK[t]}): {', '.join(where[:3])}"
        for (s, t), where in sorted(unit_edges().items())
        if RANK[t] >= RANK[s] and not any({s, t} <= c for c in KNOWN_CYCLES)
    ]
    assert upward == []


def below_the_line(module: str) -> bool:
    """Airflow-free by rule; a package counts when one of its Airflow-free modules is imported through it."""
    return unit(module) in AIRFLOW_FREE_UNITS or any(
        m == module or m.startswith(module + ".") for m in AIRFLOW_FREE_MODULES
    )


def test_nothing_below_the_line_reaches_airflow():
    offenders = []
    for module, path in package_modules().items():
        if unit(module) not in AIRFLOW_FREE_UNITS and module not in AIRFLOW_FREE_MODULES:
            continue
        for name, line in imports(path):
            top = name.split(".")[0]
            if top in WEB_AND_DB or (top == "airflow_oellm" and not below_the_line(name)):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert offenders == []


def test_the_import_reader_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The reader itself: a cycle through a function-level import must not be invisible."""
    found = dict(imports(PACKAGE / "plugins" / "dashboard.py"))
    assert "airflow_oellm.dashboard.app" in found  # imported inside a function
    names = {name for name, _ in imports(PACKAGE / "config" / "loader.py")}
    assert "airflow_oellm.config.interpolation" in names  # `from airflow_oellm.config import interpolation`
    toy = {("a", "b"): ["x:1"], ("b", "c"): ["x:2"], ("c", "a"): ["x:3"], ("c", "d"): ["x:4"]}
    assert cycles(toy) == [frozenset({"a", "b", "c"})]


def test_the_architecture_doc_prints_the_same_layers():
    doc = (REPO / "docs" / "architecture.md").read_text()
    table = dict(re.findall(r"^\| (\d) \| ([^|]+?) \|", doc, re.MULTILINE))
    printed = {name.strip("` "): int(rank) for rank, names in table.items() for name in names.split(",")}
    assert printed == RANK
