"""Write tiny Megatron checkpoints with real megatron-core on CPU, plus the logits megatron computes.

Runs in a megatron venv (scripts/megatron-venv.sh), never in the product's venv:

    python tests/convert/megatron_gold.py build CASE OUT_DIR        one process, TP1 x PP1
    torchrun --nproc_per_node 4 tests/convert/megatron_gold.py reshard CASE OUT_DIR TP PP

`build` writes OUT_DIR/torch_dist/ and OUT_DIR/torch/ (Megatron save directories: tracker file +
iter_0000100/), and OUT_DIR/reference.pt ({"tokens", "logits"}: fp32 eager forward). `reshard` loads
OUT_DIR/torch_dist with the given tensor x pipeline parallelism (megatron reshards) and saves it as
OUT_DIR/tp{TP}pp{PP}/torch_dist and .../torch (mp_rank_TT_PPP files); the reference logits stay valid.

The CPU shims below (megatron-core assumes CUDA in a few places) live here and nowhere in the product.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import types
from pathlib import Path

import numpy as np
import torch

# megatron-core 0.19 imports triton at import time from this module (MoE paged stash), reached
# from megatron.core's package import; nothing here uses it. Module level, so the checkpoint
# writer's spawned worker process gets the stand-in too.
_paged_stash = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
_paged_stash.GLOBAL_BLOCK_SIZE = 1024
_paged_stash.paged_stash_copy_kernel = _paged_stash.paged_stash_pop_kernel = None
sys.modules.setdefault(_paged_stash.__name__, _paged_stash)
if not torch.cuda.is_available():
    torch.cuda.current_device = lambda: "cpu"  # RotaryEmbedding moves inv_freq to the current device
    torch.cuda.synchronize = lambda *a, **k: None  # the dist-checkpoint writer synchronises

import torch.nn.functional as F  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.enums import AttnBackend  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

ITERATION = 100
SEQUENCE = 12


def _case(layers, hidden, heads, groups, head_dim, ffn, vocab, tied, qk_norm, theta, eps, bf16=False) -> dict:
    return dict(
        layers=layers, hidden=hidden, heads=heads, groups=groups, head_dim=head_dim, ffn=ffn, vocab=vocab,
        tied=tied, qk_norm=qk_norm, theta=theta, eps=eps, bf16=bf16,
    )  # fmt: skip


# name -> model settings; the gold ones are tiny so the committed fixtures stay small (qwen3_gqa's
# vocabulary holds a byte-level tokenizer for the evaluation tests). groups None = no GQA (MHA).
CASES: dict[str, dict] = {
    #                  layers hidden heads groups head_dim ffn vocab  tied   qk_norm  theta  eps
    "llama_gqa": _case(4, 16, 4, 2, None, 32, 64, False, False, 500000.0, 1e-5),
    "llama_mha_tied": _case(2, 16, 4, None, None, 32, 64, True, False, 10000.0, 1e-6),
    "qwen3_gqa": _case(2, 16, 4, 2, 16, 32, 384, False, True, 1000000.0, 1e-6),
    "qwen3_mqa_tied": _case(2, 16, 4, 1, 12, 32, 64, True, True, 1000000.0, 1e-6),
    # benchmarks/checkpoint_conversion.py: a 700M-parameter bf16 Llama (TinyLlama-like widths), a small one
    # for its test
    "bench_700m_bf16": _case(12, 2048, 16, 8, None, 5632, 32000, False, False, 10000.0, 1e-5, bf16=True),
    "bench_small_bf16": _case(2, 1024, 8, 4, None, 2816, 32000, False, False, 10000.0, 1e-5, bf16=True),
}


def megatron_args(case: dict, tp: int = 1, pp: int = 1) -> argparse.Namespace:
    """The Megatron-LM training arguments such a model would be trained with (what converters read)."""
    groups = case["groups"]
    return argparse.Namespace(
        num_layers=case["layers"],
        hidden_size=case["hidden"],
        ffn_hidden_size=case["ffn"],
        num_attention_heads=case["heads"],
        group_query_attention=groups is not None,
        num_query_groups=groups if groups is not None else 1,
        kv_channels=case["head_dim"] or case["hidden"] // case["heads"],
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=case["eps"],
        apply_layernorm_1p=False,
        qk_layernorm=case["qk_norm"],
        qk_l2_norm=False,
        position_embedding_type="rope",
        rotary_base=int(case["theta"]),
        rotary_percent=1.0,
        rotary_interleaved=False,
        use_rope_scaling=False,
        untie_embeddings_and_output_weights=not case["tied"],
        add_bias_linear=False,
        add_qkv_bias=False,
        multi_latent_attention=False,
        num_experts=None,
        attention_output_gate=False,
        padded_vocab_size=case["vocab"],
        make_vocab_size_divisible_by=128,
        max_position_embeddings=64,
        seq_length=64,
        bf16=case["bf16"],
        fp16=False,
        params_dtype=dtype_of(case),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        ckpt_format="torch_dist",
        tokenizer_type="NullTokenizer",
        attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder,
        iteration=ITERATION,
    )


def dtype_of(case: dict) -> torch.dtype:
    return torch.bfloat16 if case["bf16"] else torch.float32


def model_config(case: dict) -> TransformerConfig:
    groups = case["groups"]
    return TransformerConfig(
        num_layers=case["layers"],
        hidden_size=case["hidden"],
        num_attention_heads=case["heads"],
        num_query_groups=groups if groups is not None else case["heads"],
        kv_channels=case["head_dim"],
        ffn_hidden_size=case["ffn"],
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=case["eps"],
        qk_layernorm=case["qk_norm"],
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=dtype_of(case),
        pipeline_dtype=dtype_of(case),
        bf16=case["bf16"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=0.05,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )


def build_model(case: dict) -> GPTModel:
    spec = get_gpt_layer_local_spec(qk_layernorm=case["qk_norm"], normalization="RMSNorm")
    return GPTModel(
        config=model_config(case),
        transformer_layer_spec=spec,
        vocab_size=case["vocab"],
        max_sequence_length=64,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=case["tied"],
        position_embedding_type="rope",
        rotary_base=int(case["theta"]),
    )


def init_parallel(tp: int, pp: int) -> None:
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a single process: give gloo a free local port
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tp, pp)
    # model_parallel_cuda_manual_seed needs CUDA; megatron's own inert tracker does instead
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def common_state(args: argparse.Namespace) -> dict:
    return {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}


def rng_state() -> list[dict]:
    """Like Megatron-LM's: python, numpy and torch generator states (numpy globals in the pickle)."""
    return [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }
    ]


def write_tracker(save_dir: Path) -> None:
    (save_dir / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def iter_dir(save_dir: Path) -> Path:
    return save_dir / f"iter_{ITERATION:07d}"


def save_torch_dist(model: GPTModel, args: argparse.Namespace, save_dir: Path) -> None:
    directory = iter_dir(save_dir)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict() | common_state(args), str(directory))
    if torch.distributed.get_rank() == 0:
        write_tracker(save_dir)


def save_legacy(model: GPTModel, args: argparse.Namespace, save_dir: Path) -> None:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if args.pipeline_model_parallel_size > 1 else "")
    path = iter_dir(save_dir) / name / "model_optim_rng.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(common_state(args) | {"model": model.state_dict(), "rng_state": rng_state()}, path)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        write_tracker(save_dir)


def reference_logits(model: GPTModel, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (1, SEQUENCE), generator=generator)
    positions = torch.arange(SEQUENCE).unsqueeze(0)
    # masked = True above the diagonal (megatron would build this mask on "cuda")
    mask = torch.triu(torch.ones(SEQUENCE, SEQUENCE, dtype=torch.bool), diagonal=1)[None, None]
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, mask)
    return {"tokens": tokens, "logits": logits.float().contiguous()}


def build(name: str, out: Path, legacy: bool = True) -> None:
    case = CASES[name]
    init_parallel(1, 1)
    torch.manual_seed(1234)
    model = build_model(case)
    with torch.no_grad():  # norms start at 1: perturb them so a norm mix-up changes the logits
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(0.1 * torch.randn_like(param))
    args = megatron_args(case)
    save_torch_dist(model, args, out / "torch_dist")
    if legacy:
        save_legacy(model, args, out / "torch")
    if not case["bf16"]:  # the gold comparison is fp32 (bf16 logits differ by ~0.1)
        torch.save(reference_logits(model, case["vocab"]), out / "reference.pt")


def reshard(name: str, out: Path, tp: int, pp: int) -> None:
    case = CASES[name]
    init_parallel(tp, pp)
    model = build_model(case)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(iter_dir(out / "torch_dist")))
    for key in common_state(megatron_args(case)):  # common items come back too
        loaded.pop(key, None)
    model.load_state_dict(loaded)
    args = megatron_args(case, tp, pp)
    target = out / f"tp{tp}pp{pp}"
    save_torch_dist(model, args, target / "torch_dist")
    save_legacy(model, args, target / "torch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["build", "reshard"])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("out", type=Path)
    parser.add_argument("tp", type=int, nargs="?", default=1)
    parser.add_argument("pp", type=int, nargs="?", default=1)
    parser.add_argument("--torch-dist-only", action="store_true", help="build: no legacy copy")
    options = parser.parse_args()
    # relative paths only: the distributed checkpoint records the path it was saved to
    os.chdir(options.out)
    options.out = Path(".")
    if options.mode == "build":
        build(options.case, options.out, legacy=not options.torch_dist_only)
    else:
        reshard(options.case, options.out, options.tp, options.pp)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
