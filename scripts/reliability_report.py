"""Regenerate the table in docs/reliability.md from the figures the fault-injection suite recorded.

.venv/bin/python -m pytest -m faults            # writes benchmarks/results/reliability.json
.venv/bin/python scripts/reliability_report.py  # rewrites the table between the markers
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | what happened | duplicate jobs | lost events | time to recover | test |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows.values(), key=lambda r: r["test"]):
        recover = "—" if row["recover_seconds"] is None else f"{row['recover_seconds']:.1f} s"
        duplicates, lost = ("—" if row[k] is None else row[k] for k in ("duplicates", "lost_events"))
        test = row["test"].split("::")[-1]
        lines.append(
            f"| {cell(row['scenario'])} | {cell(row['happened'])} | {duplicates} | {lost} "
            f"| {recover} | `{cell(test)}` |"
        )
    last = max(row["at"] for row in rows.values())
    return "\n".join([*lines, "", f"Figures from the last run of each scenario (latest: {last})."])


def recorded_by_a_test(row: dict[str, Any], root: Path) -> bool:
    """Whether the test that recorded the row still exists (a renamed or removed scenario's figures go)."""
    path, _, name = row["test"].partition("::")
    source = root / path
    name = name.split("[", 1)[0]
    return source.is_file() and re.search(rf"^def {re.escape(name)}\(", source.read_text(), re.M) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "reliability.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--tests-root", type=Path, default=REPO, help="where the recording tests are looked up")
    args = parser.parse_args(argv)
    if not args.results.exists():
        print(f"{args.results}: no recorded run; run the suite first: pytest -m faults", file=sys.stderr)
        return 1
    rows = json.loads(args.results.read_text())
    gone = sorted(k for k, row in rows.items() if not recorded_by_a_test(row, args.tests_root))
    for scenario in gone:
        print(f"left out {scenario!r}: its test {rows.pop(scenario)['test']} no longer exists")
    doc = args.doc.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{args.doc}: the markers {BEGIN} and {END} are missing", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.doc.write_text(f"{head}{BEGIN}\n{render(rows)}\n{END}{tail}")
    print(f"{args.doc}: {len(rows)} scenarios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
