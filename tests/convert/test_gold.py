"""Gold tests: convert checkpoints written by real megatron-core, run them in `transformers` (fp32,
eager attention) and compare with the logits megatron itself computed on the same tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from airflow_oellm.megatron import readers as mg
from airflow_oellm.megatron.architecture import model_spec
from airflow_oellm.megatron.convert import convert_checkpoint
from airflow_oellm.megatron.hf_mapping import hf_tensors
from airflow_oellm.megatron.layout import locate
from airflow_oellm.megatron.readers import open_checkpoint
from airflow_oellm.megatron.safetensors_stream import OutputTensor
from tests.convert.gold import gold_cases, reference_of

pytestmark = pytest.mark.convert

TOLERANCE = 1e-5  # fp32; the wrong mappings below are off by 1e-3 .. 1
CASES = gold_cases()
IDS = [case_id for case_id, _ in CASES]


def hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def max_error(model_dir: Path, reference: dict[str, torch.Tensor]) -> float:
    return (hf_logits(model_dir, reference["tokens"]) - reference["logits"]).abs().max().item()


def test_fixtures_cover_the_required_layouts() -> None:
    assert len(CASES) >= 16
    for needed in (
        "llama_gqa/torch_dist",
        "llama_gqa/tp2pp2/torch",
        "llama_gqa/tp2pp2/torch_dist",
        "llama_mha_tied/torch",
        "qwen3_gqa/torch_dist",
        "qwen3_mqa_tied/tp2pp1/torch",
    ):
        assert f"0.19.2/{needed}" in IDS
    assert "0.16.1/llama_gqa/torch_dist" in IDS
    # the two megatron-core generations keep the common state in different places
    assert locate(dict(CASES)["0.16.1/llama_gqa/torch_dist"]).common_file is not None
    assert locate(dict(CASES)["0.19.2/llama_gqa/torch_dist"]).common_file is None


def test_the_converter_runs_without_megatron() -> None:
    assert importlib.util.find_spec("megatron") is None  # so every conversion below used no megatron code


@pytest.mark.parametrize("save_dir", [d for _, d in CASES], ids=IDS)
def test_converted_model_matches_megatron_logits(save_dir: Path, tmp_path: Path) -> None:
    reference = torch.load(reference_of(save_dir), weights_only=True)
    result = convert_checkpoint(save_dir, tmp_path / "hf", dtype="float32")
    assert result.iteration == 100 and result.dtype == "float32"
    error = max_error(tmp_path / "hf", reference)
    assert error <= TOLERANCE, f"max |logits - megatron logits| = {error}"
    assert hf_logits(tmp_path / "hf", reference["tokens"]).argmax(-1).equal(reference["logits"].argmax(-1))


def _with_substitutes(save_dir: Path, out: Path, substitute) -> float:
    """Write the HF model with some tensors produced differently, then compare logits."""
    from airflow_oellm.megatron.safetensors_stream import write_model

    layout = locate(save_dir)
    reader = open_checkpoint(layout)
    spec = model_spec(reader.args, reader.shape(mg.EMBEDDING)[0], has_qk_norm=reader.has(mg.Q_NORM))
    tensors = [substitute(t, reader, spec) for t in hf_tensors(spec, reader, torch.float32)]
    out.mkdir()
    write_model(out, tensors, 10**9)
    (out / "config.json").write_text(json.dumps(spec.hf_config("float32")))
    reader.close()
    return max_error(out, torch.load(reference_of(save_dir), weights_only=True))


def naive_qkv(tensor: OutputTensor, reader, spec) -> OutputTensor:
    """The common mistake: q, k, v as three consecutive row blocks of linear_qkv."""
    part = {"q_proj": 0, "k_proj": 1, "v_proj": 2}.get(tensor.name.split(".")[-2])
    if part is None:
        return tensor
    layer = int(tensor.name.split(".")[2])
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_groups * spec.head_dim
    bounds = [(0, q_rows), (q_rows, q_rows + kv_rows), (q_rows + kv_rows, q_rows + 2 * kv_rows)][part]
    return OutputTensor(tensor.name, tensor.shape, tensor.dtype, lambda: reader.read(mg.QKV, layer)[slice(*bounds)])


def swapped_gate_up(tensor: OutputTensor, reader, spec) -> OutputTensor:
    names = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
    kind = tensor.name.split(".")[-2]
    if kind not in names:
        return tensor
    layer = int(tensor.name.split(".")[2])
    part = 1 if kind == "gate_proj" else 0
    ffn = spec.ffn_hidden_size
    rows = slice(part * ffn, (part + 1) * ffn)
    return OutputTensor(tensor.name, tensor.shape, tensor.dtype, lambda: reader.read(mg.FC1, layer)[rows])


@pytest.mark.parametrize(
    "case", ["0.19.2/llama_gqa/torch_dist", "0.19.2/llama_mha_tied/torch", "0.19.2/qwen3_gqa/tp2pp2/torch_dist"]
)
def test_negative_control_naive_qkv_split_fails_the_tolerance(case: str, tmp_path: Path) -> None:
    error = _with_substitutes(dict(CASES)[case], tmp_path / "naive", naive_qkv)
    assert error > 100 * TOLERANCE, f"a naive [Q;K;V] split should be visibly wrong, was off by {error}"


def test_negative_control_naive_split_is_only_right_for_mqa(tmp_path: Path) -> None:
    # one query group: the per-group rule and the naive split coincide (so MQA alone cannot catch it)
    assert _with_substitutes(dict(CASES)["0.19.2/qwen3_mqa_tied/torch_dist"], tmp_path / "m", naive_qkv) <= TOLERANCE


def test_negative_control_swapped_gate_and_up_fails(tmp_path: Path) -> None:
    error = _with_substitutes(dict(CASES)["0.19.2/llama_gqa/torch"], tmp_path / "swap", swapped_gate_up)
    assert error > 10 * TOLERANCE
