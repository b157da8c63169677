"""Perplexity and bits per byte of a causal LM on a text file, with transformers alone (offline).

The text is tokenised once and scored in windows of `window` tokens that overlap by one token, so
every token after the first is predicted exactly once, from at most window-1 tokens of context.
bits/byte = summed negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the text: unlike
perplexity it does not depend on the tokenizer, so runs with different vocabularies compare.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_TEXT = Path(__file__).with_name("data") / "sample.txt"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    loss: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    bytes: int
    windows: int
    seconds: float

    def metrics(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "loss": self.loss,
            "tokens": self.tokens,
        }


def token_windows(count: int, window: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `window` tokens; consecutive ranges share one token."""
    if window < 2:
        raise ValueError(f"a perplexity window needs at least 2 tokens, not {window}")
    if count < 2:
        raise ValueError(f"the text has {count} token(s); perplexity needs at least 2")
    spans, start = [], 0
    while start < count - 1:
        end = min(start + window, count)
        spans.append((start, end))
        start = end - 1
    return spans


def perplexity(model: Any, tokenizer: Any, text: str, *, window: int = 1024, batch_size: int = 4) -> PerplexityResult:
    started = time.monotonic()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    spans = token_windows(len(ids), window)
    device = next(model.parameters()).device
    nll = 0.0
    predicted = 0
    with torch.no_grad():
        for first in range(0, len(spans), batch_size):
            batch = spans[first : first + batch_size]
            longest = max(end - start for start, end in batch)
            inputs = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, (start, end) in enumerate(batch):
                inputs[row, : end - start] = ids[start:end]
                mask[row, : end - start] = 1
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float()
            targets = inputs[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(targets.shape)
            scored = mask[:, 1:].to(device).bool()
            nll += losses[scored].double().sum().item()
            predicted += int(scored.sum().item())
    text_bytes = len(text.encode("utf-8"))
    return PerplexityResult(
        perplexity=math.exp(nll / predicted),
        bits_per_byte=nll / math.log(2) / text_bytes,
        loss=nll / predicted,
        tokens=predicted,
        bytes=text_bytes,
        windows=len(spans),
        seconds=round(time.monotonic() - started, 3),
    )
