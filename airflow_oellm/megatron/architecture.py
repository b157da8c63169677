"""What model a Megatron checkpoint holds, from its training arguments, and the HuggingFace
`config.json` for it — or a refusal naming each setting that HF's Llama / Qwen3 cannot express.

Megatron's `args` decide the architecture; the refusals matter because a converter that ignores
one of them writes a model that loads fine and computes something else (e.g. Megatron's default
`learned_absolute` positions, interleaved rotary, layernorm-1p's weight+1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

ModelType = Literal["auto", "llama", "qwen3"]
DTYPES = ("float32", "bfloat16", "float16")


class UnsupportedModelError(ValueError):
    """The checkpoint's settings cannot be converted faithfully; the message lists each one."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: Literal["llama", "qwen3"]
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int  # key/value heads
    head_dim: int
    vocab_size: int  # the (padded) embedding rows
    norm_epsilon: float
    rope_theta: float
    max_positions: int
    tied_embeddings: bool
    training_dtype: str

    @property
    def qk_norm(self) -> bool:
        return self.architecture == "qwen3"

    def hf_config(self, dtype: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architectures": ["Qwen3ForCausalLM" if self.qk_norm else "LlamaForCausalLM"],
            "model_type": self.architecture,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_groups,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_epsilon,
            # transformers 4.x reads the top-level rope_theta, 5.x rope_parameters
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_positions,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tied_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        if self.qk_norm:
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        else:
            config["mlp_bias"] = False
        return config


def _setting(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


# (setting, predicate on its value that means "cannot convert", why)
_REFUSALS: list[tuple[str, Any, str]] = [
    ("num_experts", lambda v: bool(v), "mixture-of-experts layers have no Llama/Qwen3 equivalent"),
    ("multi_latent_attention", bool, "multi-latent attention (MLA) is not Llama/Qwen3 attention"),
    ("attention_output_gate", bool, "a gated attention output has no slot in Llama/Qwen3"),
    ("apply_layernorm_1p", bool, "layernorm-1p (zero-centred gamma) would need weight+1 in HF"),
    ("rotary_interleaved", bool, "interleaved rotary needs a q/k row permutation HF does not apply"),
    ("use_rope_scaling", bool, "Llama-3.1 rope scaling is not verified by this converter yet"),
    ("rotary_seq_len_interpolation_factor", lambda v: v not in (None, 1, 1.0), "rope interpolation"),
    ("qk_l2_norm", bool, "L2 q/k normalisation is not Qwen3's RMSNorm"),
    ("add_bias_linear", bool, "biases on linear layers"),
    ("add_qkv_bias", bool, "q/k/v biases (Qwen2-style)"),
    ("squared_relu", bool, "a squared-ReLU MLP is not SwiGLU"),
    ("window_size", lambda v: v is not None, "sliding-window attention"),
    ("softmax_type", lambda v: v not in (None, "vanilla"), "a non-vanilla softmax"),
    ("no_rope_freq", lambda v: bool(v), "layers without rope"),
    ("is_hybrid_model", bool, "hybrid (Mamba) models"),
    ("hybrid_override_pattern", lambda v: bool(v), "hybrid (Mamba) models"),
]


def model_spec(
    args: argparse.Namespace, vocab_size: int, model_type: ModelType = "auto", *, has_qk_norm: bool | None = None
) -> ModelSpec:
    """The HF model for these Megatron arguments; raises UnsupportedModelError listing every problem.
    `has_qk_norm`: whether the checkpoint holds q/k layernorm weights (checked against the args)."""
    problems: list[str] = []
    position = _setting(args, "position_embedding_type", "learned_absolute")
    if position != "rope":
        problems.append(f"position_embedding_type={position!r}: only rope converts to Llama/Qwen3")
    if (_setting(args, "rotary_percent", 1.0) or 1.0) != 1.0:
        problems.append(f"rotary_percent={args.rotary_percent}: partial rotary has no HF Llama/Qwen3 form")
    if _setting(args, "normalization", "LayerNorm") != "RMSNorm":
        problems.append(f"normalization={_setting(args, 'normalization', 'LayerNorm')!r}: Llama/Qwen3 use RMSNorm")
    if not _setting(args, "swiglu", False):
        problems.append("swiglu=False: Llama/Qwen3 MLPs are SwiGLU")
    for name, refuses, why in _REFUSALS:
        value = _setting(args, name)
        if value is not None and refuses(value):
            problems.append(f"{name}={value!r}: {why}")
    qk_norm = bool(_setting(args, "qk_layernorm", False))
    if has_qk_norm is not None and has_qk_norm != qk_norm:
        problems.append(f"qk_layernorm={qk_norm} but the checkpoint {'has' if has_qk_norm else 'lacks'} q/k norms")
    if model_type == "llama" and qk_norm:
        problems.append("qk_layernorm=True has no slot in LlamaForCausalLM: use --model-type qwen3 (or auto)")
    if model_type == "qwen3" and not qk_norm:
        problems.append("qk_layernorm=False but Qwen3 normalises q and k: use --model-type llama (or auto)")
    if problems:
        raise UnsupportedModelError("cannot convert faithfully:\n  " + "\n  ".join(problems))

    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if _setting(args, "group_query_attention", False) else heads
    head_dim = int(_setting(args, "kv_channels") or args.hidden_size // heads)
    training_dtype = "bfloat16" if _setting(args, "bf16") else "float16" if _setting(args, "fp16") else "float32"
    return ModelSpec(
        architecture="qwen3" if qk_norm else "llama",
        num_layers=int(args.num_layers),
        hidden_size=int(args.hidden_size),
        ffn_hidden_size=int(_setting(args, "ffn_hidden_size") or 4 * args.hidden_size),
        num_heads=heads,
        num_groups=groups,
        head_dim=head_dim,
        vocab_size=int(vocab_size),
        norm_epsilon=float(_setting(args, "norm_epsilon", 1e-5)),
        rope_theta=float(_setting(args, "rotary_base", 10000)),
        max_positions=int(_setting(args, "max_position_embeddings") or _setting(args, "seq_length") or 4096),
        tied_embeddings=not _setting(args, "untie_embeddings_and_output_weights", False),
        training_dtype=training_dtype,
    )
