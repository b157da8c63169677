"""The converter's contract beyond the logits: safetensors layout and shards, config.json, dtypes,
atomic replacement, tokenizer files, refusals, safe unpickling, the CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from airflow_oellm.megatron import convert as convert_module
from airflow_oellm.megatron.architecture import UnsupportedModelError, model_spec
from airflow_oellm.megatron.convert import PROVENANCE_FILE, convert_checkpoint
from airflow_oellm.megatron.layout import locate
from airflow_oellm.megatron.readers import CheckpointReadError, open_checkpoint
from airflow_oellm.megatron.safetensors_stream import INDEX_FILE, SINGLE_FILE, parse_size
from airflow_oellm.megatron.unpickle import StandIn, UnsafeCheckpointError, load_distcp_metadata, load_torch_pickle
from tests.convert.gold import FIXTURES

pytestmark = pytest.mark.convert

LLAMA = FIXTURES / "core-0.19.2" / "llama_gqa"
QWEN_MQA = FIXTURES / "core-0.19.2" / "qwen3_mqa_tied"
CLI = Path(sys.executable).with_name("airflow-oellm")


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update((name, f.get_tensor(name)) for name in f.keys())  # noqa: SIM118 (safe_open has no iterator)
    return out


def test_sharded_output_has_an_index_and_the_same_tensors(tmp_path: Path) -> None:
    single = convert_checkpoint(LLAMA / "torch_dist", tmp_path / "one", dtype="float32")
    sharded = convert_checkpoint(LLAMA / "torch_dist", tmp_path / "many", dtype="float32", max_shard_size="4KiB")
    assert single.files == [SINGLE_FILE] and not (tmp_path / "one" / INDEX_FILE).exists()
    assert len(sharded.files) > 3
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(sharded.files)
    assert index["metadata"]["total_size"] == sharded.bytes == single.bytes
    one, many = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "many")
    assert set(one) == set(many) == set(index["weight_map"]) and len(one) == single.tensors
    for name, tensor in one.items():
        assert torch.equal(tensor, many[name]), name
        too_big_to_share = name.endswith(("embed_tokens.weight", "lm_head.weight"))
        assert tensor.element_size() * tensor.numel() <= 4096 or too_big_to_share


def test_files_are_written_header_first_with_aligned_contiguous_ranges(tmp_path: Path) -> None:
    convert_checkpoint(QWEN_MQA / "torch", tmp_path / "hf", dtype="float32")
    raw = (tmp_path / "hf" / SINGLE_FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header.pop("__metadata__") == {"format": "pt"}
    ranges = sorted(entry["data_offsets"] for entry in header.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == len(raw) - 8 - length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert "lm_head.weight" not in header  # tied embeddings


def test_config_json_describes_the_model(tmp_path: Path) -> None:
    convert_checkpoint(QWEN_MQA / "tp2pp1" / "torch", tmp_path / "qwen")
    convert_checkpoint(LLAMA / "tp2pp2" / "torch_dist", tmp_path / "llama")
    qwen = json.loads((tmp_path / "qwen" / "config.json").read_text())
    llama = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert qwen["architectures"] == ["Qwen3ForCausalLM"] and qwen["model_type"] == "qwen3"
    assert (qwen["num_attention_heads"], qwen["num_key_value_heads"], qwen["head_dim"]) == (4, 1, 12)
    assert qwen["tie_word_embeddings"] is True and qwen["use_sliding_window"] is False
    assert qwen["rope_theta"] == qwen["rope_parameters"]["rope_theta"] == 1e6
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["num_hidden_layers"] == 4
    assert (llama["num_key_value_heads"], llama["head_dim"], llama["rms_norm_eps"]) == (2, 4, 1e-5)
    assert llama["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5} and llama["rope_theta"] == 5e5
    assert llama["tie_word_embeddings"] is False and llama["vocab_size"] == 64
    assert llama["torch_dtype"] == "float32"  # auto: these models were trained in fp32
    provenance = json.loads((tmp_path / "llama" / PROVENANCE_FILE).read_text())
    assert provenance["iteration"] == 100 and provenance["source_format"] == "torch_dist"


def test_bfloat16_output_is_the_rounded_float32_model(tmp_path: Path) -> None:
    convert_checkpoint(LLAMA / "torch", tmp_path / "fp32", dtype="float32")
    convert_checkpoint(LLAMA / "torch", tmp_path / "bf16", dtype="bfloat16")
    fp32, bf16 = tensors_of(tmp_path / "fp32"), tensors_of(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(fp32[name].to(torch.bfloat16), bf16[name]) for name in fp32)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_converting_again_replaces_the_output_and_a_failure_keeps_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "hf"
    convert_checkpoint(LLAMA / "torch_dist", out)
    (out / "stale-file").write_text("from an earlier conversion")
    convert_checkpoint(LLAMA / "torch_dist", out, max_shard_size="8KiB")
    assert not (out / "stale-file").exists() and (out / INDEX_FILE).exists()
    before = sorted(p.name for p in out.iterdir())

    real_write = convert_module.write_model

    def dies_half_way(directory: Path, tensors: list, *args: object) -> list[str]:
        real_write(directory, tensors[: len(tensors) // 2], *args)
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(convert_module, "write_model", dies_half_way)
    with pytest.raises(OSError, match="quota"):
        convert_checkpoint(LLAMA / "torch_dist", out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left behind


def test_training_tokenizer_files_are_copied(tmp_path: Path) -> None:
    save = tmp_path / "save"
    shutil.copytree(LLAMA / "torch_dist", save)
    tokenizer = save / "iter_0000100" / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    result = convert_checkpoint(save, tmp_path / "hf")
    assert result.tokenizer_files == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def llama_args(**changes: object) -> argparse.Namespace:
    reader = open_checkpoint(locate(LLAMA / "torch_dist"))
    args = reader.args
    reader.close()
    return argparse.Namespace(**(vars(args) | changes))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"position_embedding_type": "learned_absolute"}, "position_embedding_type='learned_absolute'"),
        ({"rotary_interleaved": True}, "rotary_interleaved=True"),
        ({"num_experts": 8}, "num_experts=8"),
        ({"multi_latent_attention": True}, "multi_latent_attention=True"),
        ({"attention_output_gate": True}, "attention_output_gate=True"),
        ({"apply_layernorm_1p": True}, "apply_layernorm_1p=True"),
        ({"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
        ({"swiglu": False}, "swiglu=False"),
        ({"rotary_percent": 0.5}, "rotary_percent=0.5"),
        ({"add_qkv_bias": True}, "add_qkv_bias=True"),
    ],
)
def test_unconvertible_settings_are_refused_by_name(changes: dict, named: str) -> None:
    with pytest.raises(UnsupportedModelError, match="cannot convert faithfully") as caught:
        model_spec(llama_args(**changes), 64)
    assert named in str(caught.value)


def test_every_problem_is_listed_at_once_and_model_type_must_fit() -> None:
    with pytest.raises(UnsupportedModelError) as caught:
        model_spec(llama_args(num_experts=4, rotary_interleaved=True), 64)
    assert "num_experts=4" in str(caught.value) and "rotary_interleaved=True" in str(caught.value)
    with pytest.raises(UnsupportedModelError, match="qk_layernorm=False but Qwen3"):
        model_spec(llama_args(), 64, "qwen3")
    with pytest.raises(UnsupportedModelError, match="no slot in LlamaForCausalLM"):
        model_spec(llama_args(qk_layernorm=True), 64, "llama")


class _Call:
    """Pickles as a call of `function(*args)`."""

    def __init__(self, function: object, *args: object) -> None:
        self.call = (function, args)

    def __reduce__(self) -> tuple:
        return self.call


def test_unpickling_runs_no_code_from_the_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    torch.save({"args": argparse.Namespace(a=1), "evil": _Call(shutil.rmtree, str(victim))}, tmp_path / "evil.pt")
    loaded = load_torch_pickle(tmp_path / "evil.pt")
    assert isinstance(loaded["evil"], StandIn) and loaded["args"].a == 1
    assert victim.exists()  # rmtree became an inert stand-in

    marker = tmp_path / "pwned"
    torch.save({"evil": _Call(os.system, f"touch {marker}")}, tmp_path / "os.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*os\.pt: .*posix\.system"):
        load_torch_pickle(tmp_path / "os.pt")
    with (tmp_path / ".metadata").open("wb") as f:
        pickle.dump(_Call(os.system, f"touch {marker}"), f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_distcp_metadata(tmp_path / ".metadata")
    assert not marker.exists()
    # getattr (newer Pythons pickle enum members with it) reaches only public members of allowed classes
    for owner, name in [(torch.Size, "count"), (pathlib.PosixPath, "__class__")]:
        with (tmp_path / ".metadata").open("wb") as f:
            pickle.dump(_Call(getattr, owner, name), f)
        with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
            load_distcp_metadata(tmp_path / ".metadata")


def test_a_truncated_shard_file_is_reported(tmp_path: Path) -> None:
    save = tmp_path / "save"
    shutil.copytree(LLAMA / "torch_dist", save)
    shard = next((save / "iter_0000100").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match="truncated"):
        convert_checkpoint(save, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_cli_convert(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(CLI),
            "convert",
            "--megatron-checkpoint",
            str(LLAMA / "torch"),
            "--output-dir",
            str(tmp_path / "hf"),
            "--iteration",
            "100",
            "--dtype",
            "bfloat16",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["architecture"] == "LlamaForCausalLM" and result["dtype"] == "bfloat16"
    missing = subprocess.run(
        [
            str(CLI),
            "convert",
            "--megatron-checkpoint",
            str(LLAMA / "torch"),
            "--output-dir",
            str(tmp_path / "x"),
            "--iteration",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "has no checkpoint iter_0000200" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "x").exists()


def test_conversion_does_not_import_torch_distributed_checkpoint(tmp_path: Path) -> None:
    # importing it costs ~0.8 s per conversion job (DTensor, sympy); .metadata is read into plain records
    probe = (
        "import sys; from airflow_oellm.megatron.convert import convert_checkpoint; "
        f"convert_checkpoint({str(LLAMA / 'torch_dist')!r}, {str(tmp_path / 'hf')!r}); "
        "print('torch.distributed.checkpoint' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_metadata_falls_back_to_torch_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_oellm.megatron import unpickle

    path = LLAMA / "torch_dist" / "iter_0000100" / ".metadata"
    light = load_distcp_metadata(path)
    monkeypatch.setattr(unpickle, "_usable", lambda metadata: False)  # as if another torch pickled it
    real = load_distcp_metadata(path)
    assert type(real).__module__ == "torch.distributed.checkpoint.metadata"
    assert type(light).__module__ != type(real).__module__
    for key, value in real.state_dict_metadata.items():
        if hasattr(value, "chunks"):
            other = light.state_dict_metadata[key]
            assert (other.size, other.properties.dtype) == (value.size, value.properties.dtype)
            assert [(c.offsets, c.sizes) for c in other.chunks] == [(c.offsets, c.sizes) for c in value.chunks]
