"""scripts/reliability_report.py: the table in docs/reliability.md is regenerated from recorded figures."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.faults


def load_script():
    spec = importlib.util.spec_from_file_location("reliability_report", REPO / "scripts" / "reliability_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_is_rewritten_between_the_markers(tmp_path):
    report = load_script()
    rows = {
        "triggerer killed": {
            "scenario": "triggerer killed",
            "happened": "resumed | at the byte",
            "duplicates": 0,
            "lost_events": 0,
            "recover_seconds": 12.34,
            "figures": {},
            "test": "tests/faults/test_airflow_faults.py::test_triggerer",
            "at": "2026-11-29 07:00 UTC",
        },
        "host key": {
            "scenario": "host key",
            "happened": "refused",
            "duplicates": None,
            "lost_events": None,
            "recover_seconds": None,
            "figures": {},
            "test": "tests/cluster/test_hook.py::test_wrong_host_key",
            "at": "2026-11-29 06:00 UTC",
        },
    }
    rows["renamed"] = {**rows["host key"], "scenario": "renamed", "test": "tests/cluster/test_hook.py::test_gone"}
    for test in ("tests/faults/test_airflow_faults.py", "tests/cluster/test_hook.py"):  # the recording tests
        (tmp_path / test).parent.mkdir(parents=True, exist_ok=True)
        name = "test_triggerer" if "faults" in test else "test_wrong_host_key"
        (tmp_path / test).write_text(f"def {name}(stack):\n    pass\n")
    results = tmp_path / "r.json"
    results.write_text(json.dumps(rows))
    doc = tmp_path / "doc.md"
    doc.write_text(f"# x\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    assert report.main(["--results", str(results), "--doc", str(doc), "--tests-root", str(tmp_path)]) == 0
    text = doc.read_text()
    assert "renamed" not in text  # its test is gone: its figures with it
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "| host key | refused | — | — | — | `test_wrong_host_key` |" in text
    assert "| triggerer killed | resumed \\| at the byte | 0 | 0 | 12.3 s | `test_triggerer` |" in text
    assert "latest: 2026-11-29 07:00 UTC" in text
    assert report.main(["--results", str(tmp_path / "none.json"), "--doc", str(doc)]) == 1


def test_the_committed_doc_has_the_markers_and_a_generated_table():
    report = load_script()
    doc = (REPO / "docs" / "reliability.md").read_text()
    table = doc.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    assert table.strip().startswith("| scenario | what happened | duplicate jobs | lost events |")
