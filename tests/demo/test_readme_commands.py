"""The `airflow-oellm` commands of the README, run exactly as written (RUN: a real tiny-trainer run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.demo, pytest.mark.cli]


def readme_commands() -> list[str]:
    return [
        line.split("  #", 1)[0].strip()
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith(".venv/bin/airflow-oellm ")
    ]


def test_every_readme_command_runs(tmp_path):
    commands = readme_commands()
    assert len(commands) == 7, commands
    run = tmp_path / "run"
    trainer = REPO / "examples" / "tiny_megatron" / "pretrain_gpt.py"
    subprocess.run(
        [
            sys.executable,
            str(trainer),
            "--train-iters",
            "4",
            "--save-interval",
            "4",
            "--save",
            str(run / "checkpoints"),
            "--group-query-attention",
            "--untie-embeddings-and-output-weights",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    bin_dir = str(REPO / ".venv" / "bin")
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ["PATH"]])}
    outputs = {}
    for command in commands:
        line = command.replace("RUN/", f"{run}/").replace(".venv/bin/", f"{bin_dir}/")
        done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        outputs[command.split()[1] + (" --json" if "--json" in command else "")] = done.stdout
    assert "27 experiments" in outputs["plan"] and "4 x " in outputs["plan"]  # platform=lumi slurm.nodes=4
    assert len(json.loads(outputs["plan --json"])) == 27
    assert outputs["render"].startswith("#!/bin/bash")
    assert (run / "hf" / "latest" / "config.json").exists() and (run / "hf" / "latest" / "tokenizer.json").exists()
    result = json.loads((run / "eval.json").read_text())
    assert result["metrics"]["perplexity"] > 1 and result["tasks"] == ["perplexity"]
