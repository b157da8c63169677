"""How big a Megatron model and its checkpoint are, and how many tokens and FLOPs a training spent, from the
training's arguments alone (what `plan` shows before any save; what the sweep analysis fits).

A GPT with rope or learned positions, SwiGLU or a plain MLP, grouped-query attention and no biases (what the
presets configure). A checkpoint holds the weights in the training dtype and, unless `no_save_optim`, Adam's
state in fp32: the main parameters (with bf16 or fp16 only), the first and the second moment. The embeddings
depend on the tokenizer's vocabulary, which the arguments name only as `vocab_size` / `padded_vocab_size`:
without it the size is a lower bound (the layers only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CheckpointSize:
    bytes: int
    complete: bool  # False: the embeddings are not counted (the vocabulary is unknown), a lower bound

    def text(self) -> str:
        return f"{'' if self.complete else '>= '}{human_bytes(self.bytes)}"


def human_bytes(count: float) -> str:
    unit = "B"
    for larger in ("KB", "MB", "GB", "TB"):
        if count < 1000:
            break
        count, unit = count / 1000, larger
    return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"


def _int(args: Mapping[str, Any], key: str) -> int | None:
    value = args.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parameter_count(args: Mapping[str, Any]) -> tuple[int, bool] | None:
    """(parameters, whether the embeddings are counted), or None when the arguments do not say the shape."""
    layers, hidden, heads = _int(args, "num_layers"), _int(args, "hidden_size"), _int(args, "num_attention_heads")
    if layers is None or hidden is None or heads is None:
        return None
    ffn = _int(args, "ffn_hidden_size") or 4 * hidden
    head_dim = _int(args, "kv_channels") or hidden // heads
    groups = (_int(args, "num_query_groups") or heads) if args.get("group_query_attention") else heads
    attention = hidden * heads * head_dim + 2 * hidden * groups * head_dim + heads * head_dim * hidden
    mlp = (3 if args.get("swiglu") else 2) * hidden * ffn
    norms = 2 * hidden + (2 * head_dim if args.get("qk_layernorm") else 0)
    parameters = layers * (attention + mlp + norms) + hidden  # and the final norm
    if args.get("position_embedding_type", "learned_absolute") == "learned_absolute":
        parameters += (_int(args, "max_position_embeddings") or _int(args, "seq_length") or 0) * hidden
    vocab = _int(args, "padded_vocab_size") or _int(args, "vocab_size")
    if vocab is not None:
        parameters += vocab * hidden * (2 if args.get("untie_embeddings_and_output_weights") else 1)
    return parameters, vocab is not None


def checkpoint_size(args: Mapping[str, Any]) -> CheckpointSize | None:
    """One checkpoint's size, or None when the arguments do not say the model's shape."""
    counted = parameter_count(args)
    if counted is None:
        return None
    parameters, complete = counted
    half = bool(args.get("bf16") or args.get("fp16"))
    per_parameter = 2 if half else 4
    if not args.get("no_save_optim"):
        per_parameter += (4 if half else 0) + 8  # fp32 main parameters, Adam's two moments
    return CheckpointSize(parameters * per_parameter, complete)


def tokens_trained(args: Mapping[str, Any], iteration: int, skipped: Iterable[int] = ()) -> int | None:
    """The tokens a training has trained on at `iteration`: its trained iterations (the `skipped` ones consume
    data but train on none) times `global_batch_size` sequences of `seq_length`. None when the arguments do not
    say the batch's shape, or the batch size ramps up (`rampup_batch_size`: the log's consumed samples tell)."""
    batch, sequence = _int(args, "global_batch_size"), _int(args, "seq_length")
    if batch is None or sequence is None or args.get("rampup_batch_size") or iteration < 0:
        return None
    trained = iteration - len({i for i in skipped if 0 < i <= iteration})
    return trained * batch * sequence


def training_flops(args: Mapping[str, Any], tokens: int | float, parameters: float | None = None) -> float | None:
    """The model FLOPs of training on `tokens` (PaLM's count, appendix B): 6 N per token for the weights'
    forward and backward passes, and 12 L H Q T for attention's scores and values over a T-token sequence
    (L layers, H heads of dimension Q). None when the arguments do not say the shape. N is `parameters` when
    given (the log's count), else `parameter_count`'s (with the embeddings only when the vocabulary is known)."""
    counted = parameter_count(args)
    layers, heads, sequence = _int(args, "num_layers"), _int(args, "num_attention_heads"), _int(args, "seq_length")
    if counted is None or layers is None or heads is None or sequence is None:
        return None
    head_dim = _int(args, "kv_channels") or (_int(args, "hidden_size") or 0) // heads
    weights = counted[0] if parameters is None else parameters
    return float(tokens) * (6 * weights + 12 * layers * heads * head_dim * sequence)
