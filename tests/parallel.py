"""How CI shares two cores: a parallel pass (`OELLM_TEST_PASS=parallel pytest -n 3`), then a serial one
(`OELLM_TEST_PASS=serial pytest`); without the variable every selected test runs.

Most of the suite waits: on fake trainings that sleep, on SLURM's schedule, on Airflow's loops. Under xdist
the tests of a module stay on one worker (their module fixtures, a stack above all, are built once), except
in SPREAD: modules of independent scenarios, each with its own jobs and directories, dealt out one by one.
Tests marked `serial` need the cluster, or both cores, to themselves: the parallel pass leaves them to
the serial one.
The longest tests are collected first, so that no worker starts one late while the others are done.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

SPREAD = {
    "tests/operators/test_submit_operator.py",
    "tests/operators/test_sensors.py",
    "tests/operators/test_factory_cluster.py",
}
# Tests that keep both cores busy (real torch: megatron-core, lm-eval, the tiny trainer) share one scope,
# so they run one after another: two at once slowed a demo past its 5 minutes. The demos themselves
# (a whole Airflow and sweep each, 210 s alone, 270 s beside the parallel pass) are `serial`.
CPU_BOUND = (
    "tests/convert/test_gold_regeneration.py",
    "tests/convert/test_lm_eval.py",
    "tests/operators/test_factory_cluster.py::test_tiny_trainer_study",
)
PASSES = ("parallel", "serial")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    # xdist's own --dist loadgroup cannot see markers added at collection under pytest 9: schedule here
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

    # hand out work in collection order, which starts with the longest (below); xdist would otherwise
    # put the modules with the most tests first, and the few long scenarios would end the run alone
    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def scope(nodeid: str) -> str:
    """What xdist hands to one worker as a unit: the CPU-bound tests, a test of SPREAD, or a module."""
    if nodeid.startswith(CPU_BOUND):
        return "cpu-bound"
    module = nodeid.split("::", 1)[0]
    return nodeid if module in SPREAD else module


def expected_length(item: pytest.Item) -> int:
    """0 for the longest tests: `slow` ones, then the stacks' (`e2e`), then the cluster's, then the rest."""
    for rank, marker in enumerate(("slow", "e2e", "cluster")):
        if item.get_closest_marker(marker) is not None:
            return rank
    return 3


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=expected_length)  # stable: a module's tests keep their order
    which = os.environ.get("OELLM_TEST_PASS")
    if not which:
        return
    if which not in PASSES:
        raise pytest.UsageError(f"OELLM_TEST_PASS must be one of {', '.join(PASSES)}, not {which!r}")
    keep = [item for item in items if (item.get_closest_marker("serial") is not None) == (which == "serial")]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
