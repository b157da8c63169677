"""The gold fixtures: tiny checkpoints written by real megatron-core, and how to (re)make them.

    .venv/bin/python -m tests.convert.gold            rewrite tests/fixtures/megatron/ (commit the result)

Each megatron-core version runs in its own venv (scripts/megatron-venv.sh), so the product's venv
never has megatron importable. 0.19 keeps the common state inside the .distcp files, 0.16 writes
common.pt: both layouts are covered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "megatron"
WRITER = Path(__file__).with_name("megatron_gold.py")

# megatron-core version -> [(case, [(tp, pp) resharded copies])]
PLAN: dict[str, list[tuple[str, list[tuple[int, int]]]]] = {
    "0.19.2": [
        ("llama_gqa", [(2, 2)]),
        ("llama_mha_tied", []),
        ("qwen3_gqa", [(2, 2)]),
        ("qwen3_mqa_tied", [(2, 1)]),  # one query group on two TP ranks: each holds half a block
    ],
    "0.16.1": [("llama_gqa", []), ("qwen3_gqa", [])],
}


def megatron_python(version: str) -> Path:
    out = subprocess.run(
        [str(REPO / "scripts" / "megatron-venv.sh"), version], check=True, capture_output=True, text=True
    ).stdout
    return REPO / out.strip().splitlines()[-1]


def _run(argv: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env["PYTHONPATH"] = str(REPO)
    with log.open("a") as out:
        result = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}); see {log}")


def generate(version: str, case: str, reshards: list[tuple[int, int]], out: Path) -> Path:
    """Write `case` with megatron-core `version` into out/core-<version>/<case>; returns that dir."""
    python = megatron_python(version)
    target = out / f"core-{version}" / case
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    log = out / f"core-{version}-{case}.log"
    _run([str(python), str(WRITER), "build", case, str(target)], log)
    for tp, pp in reshards:
        torchrun = python.with_name("torchrun")
        argv = [str(torchrun), "--standalone", "--nproc_per_node", str(tp * pp), str(WRITER)]
        _run([*argv, "reshard", case, str(target), str(tp), str(pp)], log)
    return target


def gold_cases(root: Path = FIXTURES) -> list[tuple[str, Path]]:
    """(id, checkpoint save dir) of every committed checkpoint, e.g. ("0.19.2/llama_gqa/tp2pp2/torch", dir)."""
    found = []
    for tracker in sorted(root.glob("core-*/**/latest_checkpointed_iteration.txt")):
        save_dir = tracker.parent
        found.append((str(save_dir.relative_to(root)).removeprefix("core-"), save_dir))
    return found


def reference_of(save_dir: Path) -> Path:
    """The reference logits of the model a (possibly resharded) checkpoint holds."""
    for parent in save_dir.parents:
        if (parent / "reference.pt").exists():
            return parent / "reference.pt"
    raise FileNotFoundError(f"no reference.pt above {save_dir}")


def main() -> None:
    staging = FIXTURES.with_name("megatron.new")
    shutil.rmtree(staging, ignore_errors=True)
    for version, cases in PLAN.items():
        for case, reshards in cases:
            generate(version, case, reshards, staging)
            print(f"core-{version}/{case}", file=sys.stderr)
    for log in staging.glob("*.log"):
        log.unlink()
    shutil.rmtree(FIXTURES, ignore_errors=True)
    staging.rename(FIXTURES)


if __name__ == "__main__":
    main()
