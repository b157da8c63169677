"""lm-evaluation-harness tasks through `airflow-oellm evaluate`, offline, on local YAML tasks.

lm-eval is an optional extra (~600 MB with datasets, pandas, scikit-learn ...), so it lives in a
venv of its own (.venv/lm-eval) that this test builds from the lock; the product is imported from
the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from airflow_oellm.megatron.convert import convert_checkpoint
from tests.convert.gold import FIXTURES, REPO

pytestmark = [pytest.mark.convert, pytest.mark.slow]

LM_EVAL_VENV = REPO / ".venv" / "lm-eval"
QUESTIONS = [
    ("The sky is", ["blue", "green", "loud"]),
    ("Two plus two is", ["four", "seven", "purple"]),
    ("Water is", ["wet", "dry", "square"]),
    ("The sun rises in the", ["east", "west", "basement"]),
]


@pytest.fixture(scope="module")
def lm_eval_python() -> Path:
    python = LM_EVAL_VENV / "bin" / "python"
    uv = REPO / ".venv" / "bin" / "uv"
    if not python.exists():
        subprocess.run([str(uv), "venv", "-q", "--python", "/usr/bin/python3.11", str(LM_EVAL_VENV)], check=True)
    locks = [REPO / "constraints" / name for name in ("airflow-3.3.2-py3.11.txt", "lm-eval-extra-py3.11.txt")]
    wheels = os.environ.get("OELLM_WHEELS", "/opt/wheels")
    subprocess.run(
        [str(uv), "pip", "install", "-q", "--python", str(python), "-c", str(locks[0]), "-c", str(locks[1]),
         "--find-links", wheels, "torch", "transformers", "safetensors", "lm-eval", "accelerate"],
        check=True, timeout=900,
    )  # fmt: skip
    return python


def local_tasks(directory: Path) -> Path:
    """A multiple-choice and a rolling-loglikelihood task over JSONL files, as a lab would write them."""
    directory.mkdir()
    with (directory / "tiny_mc.jsonl").open("w") as f:
        for question, choices in QUESTIONS * 5:
            f.write(json.dumps({"question": question, "choices": choices, "gold": 0}) + "\n")
    with (directory / "tiny_ppl.jsonl").open("w") as f:
        for text in ["The river rose slowly through the night.", "Measurements are simple and hard."] * 3:
            f.write(json.dumps({"text": text}) + "\n")
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(directory / "tiny_mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n"
    )
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common.format(directory / "tiny_ppl.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
        "  - metric: byte_perplexity\n"
    )
    return directory


def test_harness_tasks_run_offline_next_to_the_builtin_perplexity(lm_eval_python: Path, tmp_path: Path) -> None:
    save = tmp_path / "save"
    shutil.copytree(FIXTURES / "core-0.19.2" / "qwen3_gqa" / "torch_dist", save)
    shutil.copytree(REPO / "tests" / "fixtures" / "byte_tokenizer", save / "iter_0000100" / "tokenizer")
    convert_checkpoint(save, tmp_path / "hf", dtype="float32")
    tasks = local_tasks(tmp_path / "tasks")
    out = tmp_path / "full.json"
    done = subprocess.run(
        [str(lm_eval_python), "-m", "airflow_oellm.cli", "evaluate", "--hf-dir", str(tmp_path / "hf"),
         "--output-file", str(out), "--iteration", "100", "--tasks", "perplexity,tiny_mc,tiny_ppl",
         "--include-path", str(tasks), "--window", "32"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tasks"] == ["perplexity", "tiny_mc", "tiny_ppl"]
    metrics = result["metrics"]
    assert 0 <= metrics["tiny_mc.acc"] <= 1 and metrics["tiny_mc.acc_stderr"] >= 0
    # the harness's rolling loglikelihood and the built-in perplexity measure the same model: both
    # near a uniform guess over the 257 byte tokens (8 bits per byte) for this untrained model
    assert 7 < metrics["tiny_ppl.bits_per_byte"] < 10 and 7 < metrics["bits_per_byte"] < 10
    assert "tiny_mc.sample_len" not in metrics and result["timings"]["lm_eval_seconds"] > 0

    unknown = subprocess.run(
        [str(lm_eval_python), "-m", "airflow_oellm.cli", "evaluate", "--hf-dir", str(tmp_path / "hf"),
         "--output-file", str(tmp_path / "x.json"), "--tasks", "no_such_task", "--include-path", str(tasks)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert unknown.returncode == 1 and "unknown evaluation task(s) no_such_task" in unknown.stderr
    assert not (tmp_path / "x.json").exists()
