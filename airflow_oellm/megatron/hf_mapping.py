"""Megatron parameter -> HuggingFace Llama / Qwen3 parameter, as a list of lazily produced tensors.

| HF (`model.` prefix)                   | Megatron (torch_dist names)                                 |
|----------------------------------------|-------------------------------------------------------------|
| embed_tokens                           | embedding.word_embeddings                                   |
| layers.i.input_layernorm               | layer i self_attention.linear_qkv.layer_norm_weight         |
| layers.i.self_attn.q/k/v_proj          | layer i linear_qkv, split per query group (attention.py)    |
| layers.i.self_attn.q_norm / k_norm     | layer i q_layernorm / k_layernorm (Qwen3)                   |
| layers.i.self_attn.o_proj              | layer i linear_proj                                         |
| layers.i.post_attention_layernorm      | layer i mlp.linear_fc1.layer_norm_weight                    |
| layers.i.mlp.gate_proj / up_proj       | layer i linear_fc1 rows [0:F] / [F:2F] (gate is activated)  |
| layers.i.mlp.down_proj                 | layer i linear_fc2                                          |
| norm                                   | decoder.final_layernorm                                     |
| lm_head (no prefix; absent when tied)  | output_layer                                                |
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from airflow_oellm.megatron import readers as mg
from airflow_oellm.megatron.architecture import ModelSpec
from airflow_oellm.megatron.attention import qkv_views
from airflow_oellm.megatron.readers import CheckpointReader
from airflow_oellm.megatron.safetensors_stream import OutputTensor


class _LastRead:
    """Remembers the last tensor read: q, k and v come from one linear_qkv read."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.key: tuple[str, int | None, tuple[int, int] | None] | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, name: str, layer: int | None = None, rows: slice | None = None) -> torch.Tensor:
        key = (name, layer, None if rows is None else (rows.start, rows.stop))
        if self.key != key:
            self.value = None  # free the previous one before reading the next
            self.reader.release()
            self.value = self.reader.read(name, layer, rows)
            self.key = key
        assert self.value is not None
        return self.value


def hf_tensors(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype) -> list[OutputTensor]:
    """Every HF tensor in file order, each read and converted only when written. A producer may
    return a view of another shape (q/k/v per query group): its elements in row-major order are
    the tensor's."""
    read = _LastRead(reader)
    hidden, ffn, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q_rows, kv_rows = spec.num_heads * d, spec.num_groups * d

    def qkv_part(layer: int, part: int) -> Callable[[], torch.Tensor]:
        return lambda: qkv_views(read(mg.QKV, layer), spec.num_heads, spec.num_groups, d)[part]

    def fc1_part(layer: int, part: int) -> Callable[[], torch.Tensor]:
        return lambda: read(mg.FC1, layer, slice(part * ffn, (part + 1) * ffn))

    def whole(name: str, layer: int | None = None) -> Callable[[], torch.Tensor]:
        return lambda: read(name, layer)

    out = [OutputTensor("model.embed_tokens.weight", (spec.vocab_size, hidden), dtype, whole(mg.EMBEDDING))]
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        out += [
            OutputTensor(prefix + "input_layernorm.weight", (hidden,), dtype, whole(mg.INPUT_NORM, i)),
            OutputTensor(prefix + "self_attn.q_proj.weight", (q_rows, hidden), dtype, qkv_part(i, 0)),
            OutputTensor(prefix + "self_attn.k_proj.weight", (kv_rows, hidden), dtype, qkv_part(i, 1)),
            OutputTensor(prefix + "self_attn.v_proj.weight", (kv_rows, hidden), dtype, qkv_part(i, 2)),
        ]
        if spec.qk_norm:
            out += [
                OutputTensor(prefix + "self_attn.q_norm.weight", (d,), dtype, whole(mg.Q_NORM, i)),
                OutputTensor(prefix + "self_attn.k_norm.weight", (d,), dtype, whole(mg.K_NORM, i)),
            ]
        out += [
            OutputTensor(prefix + "self_attn.o_proj.weight", (hidden, q_rows), dtype, whole(mg.ATTENTION_OUT, i)),
            OutputTensor(prefix + "post_attention_layernorm.weight", (hidden,), dtype, whole(mg.MLP_NORM, i)),
            OutputTensor(prefix + "mlp.gate_proj.weight", (ffn, hidden), dtype, fc1_part(i, 0)),
            OutputTensor(prefix + "mlp.up_proj.weight", (ffn, hidden), dtype, fc1_part(i, 1)),
            OutputTensor(prefix + "mlp.down_proj.weight", (hidden, ffn), dtype, whole(mg.FC2, i)),
        ]
    out.append(OutputTensor("model.norm.weight", (hidden,), dtype, whole(mg.FINAL_NORM)))
    if not spec.tied_embeddings:
        out.append(OutputTensor("lm_head.weight", (spec.vocab_size, hidden), dtype, whole(mg.OUTPUT_LAYER)))
    return out
