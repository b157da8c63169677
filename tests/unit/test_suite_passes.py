"""CI's two passes (tests/parallel.py) and the shared stacks (tests/shared_stack.py): every test runs in
exactly one pass, the tests that need the cluster to themselves never run beside one that uses it, and
the modules of a shared stack run one after another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel import SERIAL, scope
from tests.shared_stack import CONTROLLED, MODULES, group_of

REPO = Path(__file__).resolve().parents[2]


def collected(which: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OELLM_TEST_PASS", "PYTEST_XDIST_WORKER")}
    if which:
        env["OELLM_TEST_PASS"] = which
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def passes() -> dict[str | None, list[str]]:
    return {which: collected(which) for which in (None, "shared", "exclusive")}


def test_every_test_runs_in_exactly_one_pass(passes):
    shared, exclusive = set(passes["shared"]), set(passes["exclusive"])
    assert not shared & exclusive
    assert shared | exclusive == set(passes[None])
    assert len(passes[None]) > 700


def test_the_exclusive_pass_holds_the_serial_tests_and_only_tests_without_the_cluster_beside_them(passes):
    exclusive = passes["exclusive"]
    for listed in SERIAL:
        assert any(t == listed or t.startswith(listed + "::") for t in exclusive), listed
    beside = [t for t in exclusive if scope(t) != "serial"]
    # known users of the dev cluster: never beside the serial tests
    for module in (
        "tests/cluster/test_hook.py",
        "tests/cluster/test_sbatch_cluster.py",
        "tests/e2e/test_factory_stack.py",
    ):
        assert not [t for t in beside if t.startswith(module)], module
        assert any(t.startswith(module) for t in passes["shared"]), module
    # the local-process half of the operator tests and the unit tests use no cluster
    assert any("[local-process" in t for t in beside)
    assert not [t for t in beside if t.startswith("tests/operators/") and "[slurm" in t]
    assert any(t.startswith("tests/unit/") for t in beside)


def test_scopes_keep_a_module_together_and_deal_out_spread_and_serial_tests():
    faults = "tests/faults/test_airflow_faults.py"
    assert scope(f"{faults}::test_ssh_and_slurmctld_outages_cause_no_false_state_and_no_failure") == "serial"
    assert scope(f"{faults}::test_x") == faults
    assert scope("tests/demo/test_make_demo.py::test_demo_on_the_dev_cluster") == "serial"
    assert scope("tests/demo/test_make_demo.py::test_demo_falls_back_to_local_processes") == "serial"
    assert scope("tests/convert/test_lm_eval.py::test_y") == "cpu-bound"
    spread = "tests/operators/test_sensors.py::test_z[slurm-deferred]"
    assert scope(spread) == spread
    assert scope("tests/cluster/test_hook.py::test_a") == "tests/cluster/test_hook.py"


def test_a_controlled_stacks_tests_share_one_worker_in_each_pass(passes):
    # kill and start work only in the process that started the stack: in a pass, its tests are one unit
    for which in ("shared", "exclusive"):
        for name in CONTROLLED:
            units = {scope(t) for t in passes[which] if group_of(t) == name}
            assert len(units) <= 1, (which, name, units)
    assert any(group_of(t) == "faults" for t in passes["shared"])  # the faults that take only their own stack's


def test_a_shared_stacks_modules_run_one_after_another(passes):
    for which in (None, "shared", "exclusive"):
        order = [group_of(t) for t in passes[which]]
        for name, modules in MODULES.items():
            positions = [i for i, group in enumerate(order) if group == name]
            if positions:
                assert positions == list(range(positions[0], positions[-1] + 1)), (which, name, modules)
