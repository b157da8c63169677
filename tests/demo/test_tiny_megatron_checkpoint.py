"""The tiny trainer's model and checkpoints (examples/tiny_megatron): written by plain
torch.distributed.checkpoint in megatron-core's layout, restored exactly, and converted by the
product's converter into a HuggingFace model that reproduces the trainer's own logits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from airflow_oellm.megatron.convert import convert_checkpoint
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "examples" / "tiny_megatron"))

import megatron_checkpoint as checkpoint
from gpt_model import GPTConfig, TinyGPT

pytestmark = [pytest.mark.demo, pytest.mark.convert]


def megatron_args(c: GPTConfig) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads, group_query_attention=True, num_query_groups=c.num_query_groups,
        kv_channels=c.kv_channels, swiglu=True, normalization="RMSNorm", norm_epsilon=c.norm_epsilon,
        position_embedding_type="rope", rotary_base=c.rotary_base, rotary_percent=1.0, qk_layernorm=c.qk_layernorm,
        untie_embeddings_and_output_weights=c.untie_embeddings_and_output_weights, padded_vocab_size=c.vocab_size,
        max_position_embeddings=256, seq_length=256, bf16=False,
    )  # fmt: skip


def trained_step(c: GPTConfig) -> tuple[TinyGPT, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyGPT(c, init_std=0.05)
    with torch.no_grad():  # norms start at 1: perturb them so a norm mix-up shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, c.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, c.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    optimizer.step()
    return model, optimizer, tokens


@pytest.mark.parametrize(
    "config",
    [GPTConfig(), GPTConfig(qk_layernorm=True, untie_embeddings_and_output_weights=False, num_query_groups=1)],
    ids=["llama_gqa_untied", "qwen3_mqa_tied"],
)
def test_checkpoint_round_trip_and_conversion_reproduce_the_trainer(config: GPTConfig, tmp_path: Path) -> None:
    model, optimizer, tokens = trained_step(config)
    checkpoint.save(tmp_path / "ckpt", 5, model, optimizer, megatron_args(config), {"consumed_samples": 10})
    assert checkpoint.latest(tmp_path / "ckpt") == 5

    restored = TinyGPT(config)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    common = checkpoint.load(tmp_path / "ckpt", 5, restored, restored_optimizer)
    assert common["iteration"] == 5 and common["consumed_samples"] == 10
    with torch.no_grad():
        reference = model(tokens)
        assert torch.equal(restored(tokens), reference)
    for param, other in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(optimizer.state[param]["exp_avg"], restored_optimizer.state[other]["exp_avg"])

    result = convert_checkpoint(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    assert result.architecture == ("Qwen3ForCausalLM" if config.qk_layernorm else "LlamaForCausalLM")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        error = (hf(tokens).logits - reference).abs().max().item()
    assert error <= 1e-5, error
