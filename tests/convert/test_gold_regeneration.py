"""Format drift: write fresh checkpoints with real megatron-core (both common-state generations,
one resharded to TP2 x PP2 by megatron itself) and convert them, so a megatron-core release that
changes what it writes fails here rather than in a user's conversion job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from airflow_oellm.megatron.convert import convert_checkpoint
from tests.convert.gold import generate, gold_cases, reference_of
from tests.convert.test_gold import TOLERANCE, max_error

pytestmark = [pytest.mark.convert, pytest.mark.slow]


@pytest.mark.parametrize(
    ("version", "case", "reshards"), [("0.19.2", "qwen3_gqa", [(2, 2)]), ("0.16.1", "llama_gqa", [])]
)
def test_fresh_megatron_checkpoints_convert_exactly(version: str, case: str, reshards: list, tmp_path: Path) -> None:
    generate(version, case, reshards, tmp_path)
    written = gold_cases(tmp_path)
    assert len(written) == 2 + 2 * len(reshards)
    for case_id, save_dir in written:
        out = tmp_path / "hf" / case_id.replace("/", "_")
        convert_checkpoint(save_dir, out, dtype="float32")
        error = max_error(out, torch.load(reference_of(save_dir), weights_only=True))
        assert error <= TOLERANCE, f"{case_id}: max |logits - megatron logits| = {error}"
