"""The row layout of megatron-core's fused attention projection `linear_qkv`, and its split into
HuggingFace's separate q/k/v projections.

With nh query heads in ng query groups (KV heads), p = nh / ng and head size d, the rows form ng
consecutive blocks of (p + 2)·d rows: block g holds query heads g·p … g·p+p-1, then key head g,
then value head g (`get_query_key_value_tensors` in megatron-core's attention.py). Viewing the
rows as [ng, p+2, d] gives q, k and v in exactly HF's head order. MHA is p = 1, MQA is ng = 1.
A plain [Q; K; V] split coincides with this only for MQA. Tensor-parallel shards each hold a
contiguous row range of this layout, so they are concatenated on dim 0 before splitting.

Works on anything with `.shape`, `.reshape` and slicing (torch tensors, numpy arrays).
"""

from __future__ import annotations

from typing import Any


class AttentionLayoutError(ValueError):
    """The tensor does not have the shape the model's settings imply."""


def qkv_rows(num_heads: int, num_groups: int, head_dim: int) -> int:
    if num_heads <= 0 or num_groups <= 0 or head_dim <= 0 or num_heads % num_groups:
        raise AttentionLayoutError(
            f"{num_heads} attention heads cannot form {num_groups} query groups of head size {head_dim}"
        )
    return (num_heads + 2 * num_groups) * head_dim


def qkv_views(fused: Any, num_heads: int, num_groups: int, head_dim: int) -> tuple[Any, Any, Any]:
    """q [ng, p, d, …], k [ng, d, …], v [ng, d, …] as views of a contiguous fused tensor (no copy):
    in row-major order their elements are exactly HF's q/k/v projections."""
    rows = qkv_rows(num_heads, num_groups, head_dim)
    if fused.shape[0] != rows:
        raise AttentionLayoutError(
            f"linear_qkv has {fused.shape[0]} rows; {num_heads} heads in {num_groups} groups of size "
            f"{head_dim} need {rows}"
        )
    per_group = num_heads // num_groups
    blocks = fused.reshape(num_groups, per_group + 2, head_dim, *fused.shape[1:])
    return blocks[:, :per_group], blocks[:, per_group], blocks[:, per_group + 1]


def split_qkv(fused: Any, num_heads: int, num_groups: int, head_dim: int) -> tuple[Any, Any, Any]:
    """q [nh·d, …], k [ng·d, …], v [ng·d, …] from a fused weight [rows, hidden] or bias [rows]."""
    q, k, v = qkv_views(fused, num_heads, num_groups, head_dim)
    rest = tuple(fused.shape[1:])
    return (
        q.reshape(num_heads * head_dim, *rest),
        k.reshape(num_groups * head_dim, *rest),
        v.reshape(num_groups * head_dim, *rest),
    )
