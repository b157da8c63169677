"""A small Llama-style GPT in plain PyTorch with megatron-core's parameter layout.

Parameter names and layouts are megatron-core's (Transformer Engine / torch_dist names), so a
checkpoint of this model is read by Megatron tooling and by airflow-oellm's converter like a real
one: the fused `linear_qkv` rows are grouped per query group ([q heads of group g; k_g; v_g]),
`linear_fc1` is [gate; up] with SiLU on the gate, RMSNorm weights sit on the following linear
layer (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`), RoPE rotates the two
halves of each head (not interleaved), optional q/k RMSNorm over the head dimension (Qwen3-style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 16  # head dim
    ffn_hidden_size: int = 176
    vocab_size: int = 384  # 256 bytes + end-of-text, padded to a multiple of 128 like Megatron
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = True


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).type_as(x) * self.weight


class NormedLinear(nn.Module):
    """A linear layer with the RMSNorm that precedes it, as Transformer Engine's LayerNormLinear."""

    def __init__(self, inputs: int, outputs: int, eps: float) -> None:
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(inputs))
        self.weight = nn.Parameter(torch.empty(outputs, inputs))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
        return F.linear(normed, self.weight)


def rotary(positions: torch.Tensor, dim: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c = c
        rows = (c.num_attention_heads + 2 * c.num_query_groups) * c.kv_channels
        self.linear_qkv = NormedLinear(c.hidden_size, rows, c.norm_epsilon)
        self.linear_proj = nn.Linear(c.num_attention_heads * c.kv_channels, c.hidden_size, bias=False)
        if c.qk_layernorm:
            self.q_layernorm = RMSNorm(c.kv_channels, c.norm_epsilon)
            self.k_layernorm = RMSNorm(c.kv_channels, c.norm_epsilon)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.c
        batch, length, _ = x.shape
        per_group = c.num_attention_heads // c.num_query_groups
        blocks = self.linear_qkv(x).view(batch, length, c.num_query_groups, per_group + 2, c.kv_channels)
        q = blocks[..., :per_group, :].reshape(batch, length, c.num_attention_heads, c.kv_channels)
        k, v = blocks[..., per_group, :], blocks[..., per_group + 1, :]
        if c.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, length, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.linear_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.linear_fc1 = NormedLinear(c.hidden_size, 2 * c.ffn_hidden_size, c.norm_epsilon)
        self.linear_fc2 = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.self_attention = Attention(c)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(x, cos, sin)
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.final_layernorm = RMSNorm(c.hidden_size, c.norm_epsilon)


class Embedding(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)


class TinyGPT(nn.Module):
    def __init__(self, c: GPTConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.config = c
        self.embedding = Embedding(c)
        self.decoder = Decoder(c)
        if c.untie_embeddings_and_output_weights:
            self.output_layer = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        for name, param in self.named_parameters():
            if name.endswith("norm_weight") or "layernorm" in name:
                continue
            nn.init.normal_(param, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] for token ids [batch, length]."""
        c = self.config
        cos, sin = rotary(torch.arange(tokens.shape[1]), c.kv_channels, c.rotary_base)
        x = self.embedding.word_embeddings(tokens)
        for layer in self.decoder.layers:
            x = layer(x, cos, sin)
        x = self.decoder.final_layernorm(x)
        tied = not c.untie_embeddings_and_output_weights
        return F.linear(x, self.embedding.word_embeddings.weight if tied else self.output_layer.weight)
