"""The fused QKV split against an independently built Megatron layout (group blocks of p query heads,
then that group's key and value head), for MHA, GQA and MQA, weights and biases, and a negative
control: the naive [Q; K; V] split is wrong except for MQA."""

from __future__ import annotations

import numpy as np
import pytest

from airflow_oellm.megatron.attention import AttentionLayoutError, qkv_rows, split_qkv

pytestmark = pytest.mark.convert


def megatron_fused(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, groups: int, d: int) -> np.ndarray:
    """Rows as megatron-core lays them out, written head by head."""
    p = heads // groups
    rows = []
    for g in range(groups):
        rows += [q[h * d : (h + 1) * d] for h in range(g * p, g * p + p)]
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    return np.concatenate(rows)


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (8, 2), (6, 3), (4, 1)], ids=["mha", "gqa4", "gqa2", "mqa"])
@pytest.mark.parametrize("hidden", [(16,), ()], ids=["weight", "bias"])
def test_split_recovers_hf_q_k_v(heads, groups, hidden):
    d = 3
    rng = np.random.default_rng(heads * 10 + groups)
    q = rng.normal(size=(heads * d, *hidden))
    k = rng.normal(size=(groups * d, *hidden))
    v = rng.normal(size=(groups * d, *hidden))
    fused = megatron_fused(q, k, v, heads, groups, d)
    assert fused.shape[0] == qkv_rows(heads, groups, d)
    got_q, got_k, got_v = split_qkv(fused, heads, groups, d)
    assert np.array_equal(got_q, q) and np.array_equal(got_k, k) and np.array_equal(got_v, v)
    naive = np.split(fused, [heads * d, heads * d + groups * d])
    naive_right = all(np.array_equal(a, b) for a, b in zip(naive, (q, k, v), strict=True))
    assert naive_right == (groups == 1)  # the negative control: only MQA survives a plain split


def test_tensor_parallel_shards_concatenate_before_the_split():
    heads, groups, d, tp = 8, 4, 2, 2
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(n * d, 5)) for n in (heads, groups, groups))
    fused = megatron_fused(q, k, v, heads, groups, d)
    shards = np.split(fused, tp)  # each rank holds a contiguous row range (ng/tp whole blocks)
    got_q, _, _ = split_qkv(np.concatenate(shards), heads, groups, d)
    assert np.array_equal(got_q, q)


def test_shape_errors_say_what_was_expected():
    with pytest.raises(AttentionLayoutError, match="6 attention heads cannot form 4 query groups"):
        split_qkv(np.zeros((10, 2)), 6, 4, 2)
    with pytest.raises(AttentionLayoutError, match="linear_qkv has 10 rows; 4 heads in 2 groups of size 2 need 16"):
        split_qkv(np.zeros((10, 2)), 4, 2, 2)
