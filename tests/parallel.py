"""How CI shares two cores: two passes, each under xdist.

- `OELLM_TEST_PASS=shared pytest -n 3`: the tests that use the dev cluster and can share it. Most of
  their time is waiting, on fake trainings that sleep, on SLURM's schedule, on Airflow's loops.
- `OELLM_TEST_PASS=exclusive pytest -n 3`: one worker runs the SERIAL tests one after another, each with
  the cluster to itself, and takes nothing else; the other two run the tests that use no cluster at all,
  which nothing the serial tests do can disturb.

The tests of a module stay on one worker (their module fixtures, a stack above all, are built once),
except in SPREAD: modules of independent scenarios, each with its own jobs and directories, dealt out
one by one. The tests that keep both cores busy (CPU_BOUND) run one after another. The longest tests
are collected first, so that no worker starts one late while the others are done. Without the
variable every selected test runs.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.shared_stack import group_of

SPREAD = {
    "tests/operators/test_submit_operator.py",
    "tests/operators/test_sensors.py",
    "tests/operators/test_factory_cluster.py",
}
# Tests that need the dev cluster to themselves (a module, or one test of one), why, and in the order they
# run. The fault scenarios that take the cluster or PostgreSQL away first: they mostly wait. The fault
# scenarios that kill only their own stack's components share the cluster in the first pass. The CPU-bound
# tests last, once the CPU-bound tests beside them are done (two demos at once took over 5 minutes).
FAULTS = "tests/faults/test_airflow_faults.py"
SERIAL = {
    f"{FAULTS}::test_triggerer_killed_with_twenty_deferred_the_other_takes_over_at_the_saved_bytes": "counts "
    "slurmctld's RPCs; its twenty held jobs fill the cluster",
    f"{FAULTS}::test_ssh_and_slurmctld_outages_cause_no_false_state_and_no_failure": "stops sshd and slurmctld",
    f"{FAULTS}::test_a_refused_key_is_waited_out_for_max_outage_and_the_watch_carries_on": "refuses the cluster "
    "user's key to everyone",
    f"{FAULTS}::test_postgresql_restarted_mid_run_loses_no_task_and_repeats_none": "restarts the PostgreSQL "
    "every production stack uses",
    "tests/e2e/test_stack.py": "kills its own triggerer; the settle race is timed on a machine not otherwise busy",
    "tests/cluster/test_poller.py": "counts slurmctld's RPCs, kills sshd",
    "tests/bench/test_benchmarks.py::test_status_poll_benchmark_runs_and_batches": "slurmctld's RPC counts",
    # beside the shared pass's stacks and tests its experiment took over 280 s (70 s alone)
    "tests/e2e/test_compose_stack.py": "a demo experiment's real CPU work through a Celery stack of its own",
    # 262 s of its 300 alone; beside the production fault stack it took 307 and 316 s
    "tests/demo/test_make_demo.py::test_demo_falls_back_to_local_processes": "a whole sweep on both cores",
    "tests/demo/test_make_demo.py::test_demo_on_the_dev_cluster": "a whole sweep within 5 minutes, on both cores",
}
# Real torch (the local-process demo, megatron-core, lm-eval, the tiny trainer) keeps both cores busy:
# these share one scope, so they run one after another, in this order. Two at once slowed a demo past
# its 5 minutes; the local-process demo is SERIAL for that reason.
CPU_BOUND = (
    "tests/demo/test_tiny_trainer.py",
    "tests/convert/test_gold_regeneration.py",
    "tests/convert/test_lm_eval.py",
    "tests/operators/test_factory_cluster.py::test_tiny_trainer_study",
    # the streaming converter against the naive one, timed side by side in one run: a ratio
    "tests/bench/test_benchmarks.py::test_convert_benchmark",
)
CLUSTER_FIXTURES = {"dev_cluster", "slurm_conn_id", "cluster_tools"}
PASSES = ("shared", "exclusive")


def serial_rank(nodeid: str) -> int | None:
    """The position in SERIAL of the entry naming this test, or None."""
    for rank, listed in enumerate(SERIAL):
        if nodeid.split("[", 1)[0] == listed or nodeid.split("::", 1)[0] == listed:
            return rank
    return None


def is_serial(nodeid: str) -> bool:
    return serial_rank(nodeid) is not None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    # xdist's own --dist loadgroup cannot see markers added at collection under pytest 9: schedule here
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

        def _reschedule(self, node: Any) -> None:
            # the serial tests' worker takes nothing else before their last one: a unit queued behind them
            # would wait for all of them. At the last, it is given more or shut down (a worker starts a
            # test only once it knows the next one, or that there is none).
            work = self.assigned_work.get(node, {})
            if "serial" in work and self._pending_of({"serial": work["serial"]}) > 1:
                return
            super()._reschedule(node)

    # hand out work in collection order, which starts with the longest (below); xdist would otherwise
    # put the modules with the most tests first, and the few long scenarios would end the run alone
    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def scope(nodeid: str) -> str:
    """What xdist hands to one worker as a unit: the serial tests, the CPU-bound ones, a test of SPREAD,
    or a module."""
    if is_serial(nodeid):
        return "serial"
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


def uses_cluster(item: pytest.Item) -> bool:
    return item.get_closest_marker("cluster") is not None  # the conftests' markers, and pytest_itemcollected's


def in_pass(item: pytest.Item, which: str) -> bool:
    if which == "shared":
        return uses_cluster(item) and item.get_closest_marker("serial") is None
    return item.get_closest_marker("serial") is not None or not uses_cluster(item)


def pytest_itemcollected(item: pytest.Item) -> None:
    # before any selection: `-m serial` and `-m cluster` see these
    if is_serial(item.nodeid):
        item.add_marker(pytest.mark.serial)
    if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(trylast=True)  # after the conftests have marked their tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # stable: a module's tests keep their order; the modules sharing a stack come one after another
    group_rank: dict[str, int] = {}
    group_serial: dict[str, int] = {}  # a stack's last SERIAL test: the rest of its tests follow it
    for item in items:
        if group := group_of(item.nodeid):
            group_rank[group] = min(group_rank.get(group, 3), expected_length(item))
            if (serial := serial_rank(item.nodeid)) is not None:
                group_serial[group] = max(group_serial.get(group, serial), serial)

    def order(item: pytest.Item) -> tuple[int, int, str]:
        serial = serial_rank(item.nodeid)
        if serial is not None:  # first: theirs is the longest lane
            return -1, serial, ""
        if (group := group_of(item.nodeid)) in group_serial:  # run without passes, a stack boots once
            return -1, group_serial[group], group
        cpu_bound = next((rank for rank, listed in enumerate(CPU_BOUND) if item.nodeid.startswith(listed)), None)
        if cpu_bound is not None:  # next, in CPU_BOUND's order
            return -1, len(SERIAL) + cpu_bound, ""
        group = group_of(item.nodeid) or ""
        return group_rank.get(group, expected_length(item)), 0, group

    items.sort(key=order)
    which = os.environ.get("OELLM_TEST_PASS")
    if not which:
        return
    if which not in PASSES:
        raise pytest.UsageError(f"OELLM_TEST_PASS must be one of {', '.join(PASSES)}, not {which!r}")
    keep = [item for item in items if in_pass(item, which)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
