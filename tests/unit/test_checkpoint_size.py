"""A checkpoint's size from the training's arguments (megatron/size.py), against real megatron-core checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from airflow_oellm.megatron.layout import locate
from airflow_oellm.megatron.readers import open_checkpoint
from airflow_oellm.megatron.size import (
    checkpoint_size,
    human_bytes,
    parameter_count,
    tokens_trained,
    training_flops,
)
from airflow_oellm.megatron.unpickle import load_distcp_metadata
from tests.conftest import REPO

pytestmark = [pytest.mark.unit, pytest.mark.retention]
GOLD = sorted((REPO / "tests" / "fixtures" / "megatron").glob("*/*/torch_dist"))


@pytest.mark.parametrize("directory", GOLD, ids=lambda d: "/".join(Path(d).parts[-3:-1]))
def test_the_parameter_count_is_what_megatron_core_saved(directory):
    """Llama and Qwen3 shapes (GQA, MQA, MHA, tied and untied, q/k norms), saved by megatron-core 0.16 and 0.19:
    the count from the arguments the checkpoint holds is the number of weights in it."""
    reader = open_checkpoint(locate(directory))
    try:
        args = vars(reader.args)
    finally:
        reader.close()
    iteration = sorted(directory.glob("iter_*"))[-1]
    saved = load_distcp_metadata(iteration / ".metadata").state_dict_metadata
    weights = sum(
        math.prod(entry.size)
        for key, entry in saved.items()
        if hasattr(entry, "chunks") and not key.startswith("optimizer") and "_extra_state" not in key
    )
    assert parameter_count(args) == (weights, True)


def test_the_bytes_per_parameter_and_a_lower_bound_without_the_vocabulary():
    shape = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 176, "swiglu": True}
    layers_only = parameter_count({**shape, "position_embedding_type": "rope"})
    assert layers_only is not None and not layers_only[1]
    rope = {**shape, "position_embedding_type": "rope"}
    assert checkpoint_size({**rope, "bf16": True}).bytes == layers_only[0] * 14  # bf16 + fp32 main + Adam
    assert checkpoint_size(rope).bytes == layers_only[0] * 12  # fp32 + Adam
    assert checkpoint_size({**rope, "bf16": True, "no_save_optim": True}).bytes == layers_only[0] * 2
    assert checkpoint_size({**rope, "bf16": True}).text().startswith(">= ")
    assert not checkpoint_size({**rope, "padded_vocab_size": 384}).text().startswith(">")
    assert checkpoint_size({"hidden_size": 64}) is None
    assert [human_bytes(n) for n in (999, 1500, 2.5e9, 7e15)] == ["999 B", "1.5 KB", "2.5 GB", "7000.0 TB"]


def test_tokens_and_flops_of_a_training_from_its_arguments():
    shape = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 176, "swiglu": True}
    args = {**shape, "position_embedding_type": "rope", "padded_vocab_size": 384, "global_batch_size": 16}
    args["seq_length"] = 128
    assert tokens_trained(args, 100) == 100 * 16 * 128
    # skipped iterations consume data but train on none; those after the iteration do not count yet
    assert tokens_trained(args, 100, [51, 52, 53, 150]) == 97 * 16 * 128
    assert tokens_trained({**args, "rampup_batch_size": [4, 4, 1000]}, 100) is None
    assert tokens_trained({"seq_length": 128}, 100) is None
    n = parameter_count(args)[0]
    per_token = 6 * n + 12 * 2 * 4 * 16 * 128  # PaLM: 6 N + 12 L H Q T
    assert training_flops(args, 1_000_000) == pytest.approx(per_token * 1e6)
    # for a model much wider than its sequence, the weights dominate: close to 6 N D
    wide = {**args, "num_layers": 24, "hidden_size": 2048, "num_attention_heads": 16, "ffn_hidden_size": 5632}
    assert 6 * parameter_count(wide)[0] * 1e9 < training_flops(wide, 1e9) < 6.1 * parameter_count(wide)[0] * 1e9
    assert training_flops({"hidden_size": 64}, 1e6) is None
