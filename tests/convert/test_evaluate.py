"""Evaluation of a converted checkpoint: perplexity / bits per byte checked against transformers'
own loss, the results JSON, offline operation and clear errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from airflow_oellm.evaluation.perplexity import DEFAULT_TEXT, token_windows
from airflow_oellm.evaluation.run import EvaluationError, evaluate
from airflow_oellm.megatron.convert import convert_checkpoint
from tests.convert.gold import FIXTURES

pytestmark = pytest.mark.convert

QWEN = FIXTURES / "core-0.19.2" / "qwen3_gqa" / "torch_dist"  # vocabulary large enough for byte tokens
BYTE_TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "byte_tokenizer"
CLI = Path(sys.executable).with_name("airflow-oellm")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen3 fixture with a byte-level tokenizer saved beside it, as Megatron-LM saves the training one."""
    save = tmp_path_factory.mktemp("ckpt") / "save"
    shutil.copytree(QWEN, save)
    shutil.copytree(BYTE_TOKENIZER, save / "iter_0000100" / "tokenizer")
    out = save.parent / "hf"
    convert_checkpoint(save, out, dtype="float32")
    return out


def test_token_windows_predict_every_token_once() -> None:
    for count, window in [(2, 2), (10, 4), (1000, 256), (7, 100)]:
        spans = token_windows(count, window)
        assert all(end - start <= window for start, end in spans)
        predicted = [t for start, end in spans for t in range(start + 1, end)]
        assert predicted == list(range(1, count))
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(1, 8)


def test_perplexity_matches_transformers_loss(hf_model: Path, tmp_path: Path) -> None:
    text = "A fixed text, held out from training, is scored."  # fits one window (the model sees 64)
    (tmp_path / "text.txt").write_text(text)
    doc = evaluate(hf_model, tmp_path / "r.json", iteration=100, text_file=tmp_path / "text.txt", window=4096)
    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(hf_model)(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()  # mean over the n-1 predicted tokens
    assert doc["metrics"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert doc["metrics"]["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    n_bytes = len(text.encode())
    assert doc["metrics"]["bits_per_byte"] == pytest.approx(expected * (ids.shape[1] - 1) / math.log(2) / n_bytes)
    # shorter windows: less context per token, every token still scored once
    short = evaluate(hf_model, tmp_path / "s.json", text_file=tmp_path / "text.txt", window=8)
    assert short["details"]["perplexity"]["tokens"] == ids.shape[1] - 1
    assert short["details"]["perplexity"]["windows"] > 1


def test_results_json(hf_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "evals" / "iter_0000100" / "quick.json"
    doc = evaluate(hf_model, out, iteration=100, tasks=["perplexity"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc, default=str))
    assert doc["iteration"] == 100 and doc["tasks"] == ["perplexity"]
    assert set(doc["metrics"]) == {"perplexity", "bits_per_byte", "loss"}
    assert doc["details"]["perplexity"]["text_file"] == str(DEFAULT_TEXT)
    assert doc["model"]["architecture"] == "Qwen3ForCausalLM" and doc["model"]["parameters"] > 10_000
    assert doc["timings"]["total_seconds"] >= doc["timings"]["perplexity_seconds"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["quick.json"]  # no temporary file left


def test_errors_name_what_is_missing(hf_model: Path, tmp_path: Path) -> None:
    no_tokenizer = tmp_path / "bare"
    shutil.copytree(hf_model, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(EvaluationError, match=r"no tokenizer files.*--tokenizer"):
        evaluate(no_tokenizer, tmp_path / "r.json")
    assert evaluate(no_tokenizer, tmp_path / "r.json", tokenizer_dir=BYTE_TOKENIZER)["metrics"]["perplexity"] > 1
    with pytest.raises(EvaluationError, match="no HuggingFace model directory"):
        evaluate(tmp_path / "nowhere", tmp_path / "x.json")
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate(hf_model, tmp_path / "x.json", text_file=tmp_path / "missing.txt")
    assert not (tmp_path / "x.json").exists()


def test_cli_evaluate(hf_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [
            str(CLI),
            "evaluate",
            "--hf-dir",
            str(hf_model),
            "--output-file",
            str(out),
            "--iteration",
            "100",
            "--tasks",
            "perplexity",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "evaluated iteration 100 (perplexity): perplexity" in done.stdout
    assert json.loads(out.read_text())["iteration"] == 100
