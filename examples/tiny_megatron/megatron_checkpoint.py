"""Megatron-style checkpoints of the tiny GPT: the torch_dist layout megatron-core writes.

    <save>/iter_0000100/{.metadata, __0_0.distcp, metadata.json}   metadata.json last (= complete)
    <save>/latest_checkpointed_iteration.txt                         after the checkpoint is complete

Written with torch.distributed.checkpoint in one process, `tokenizer/` beside the shards. Layer
tensors are stacked over layers under megatron-core's names
(`decoder.layers.self_attention.linear_qkv.weight` [layers, rows, hidden]); Adam's moments sit
under `optimizer.state.exp_avg.<name>` / `exp_avg_sq`, and the non-tensor state (training
arguments, iteration, scheduler, RNG) in the bytes item `common_state/shard_0_1`, as
megatron-core 0.17+ stores it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = "common_state/shard_0_1"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    with warnings.catch_warnings():  # one process, no process group: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def stacked(named: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Per-layer tensors stacked over layers under one name; the others as they are."""
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in named.items():
        match = _LAYER.match(name)
        if match:
            per_layer.setdefault(match.group(2), [None] * num_layers)[int(match.group(1))] = tensor
        else:
            out[name] = tensor
    for suffix, tensors in per_layer.items():
        out[f"decoder.layers.{suffix}"] = torch.stack([t for t in tensors if t is not None])
    return out


def unstacked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith("decoder.layers."):
            suffix = name[len("decoder.layers.") :]
            out.update((f"decoder.layers.{i}.{suffix}", layer) for i, layer in enumerate(tensor))
        else:
            out[name] = tensor
    return out


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for param, state in optimizer.state.items():
        for key in moments:
            if key in state:
                moments[key][names[id(param)]] = state[key]
    layers = model.config.num_layers
    return {
        f"optimizer.state.{key}.{name}": tensor
        for key, named in moments.items()
        for name, tensor in stacked(named, layers).items()
    }


def save(
    save_dir: str | Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    extra: dict[str, Any],
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write checkpoint `iteration` (with a copy of the tokenizer, as Megatron-LM saves it into
    iter_N/tokenizer/); the tracker file moves only once it is complete."""
    directory = iteration_dir(save_dir, iteration)
    directory.mkdir(parents=True, exist_ok=True)
    common = {"args": args, "iteration": iteration, "checkpoint_version": 3.0, **extra}
    buffer = io.BytesIO()
    torch.save([common], buffer)
    state: dict[str, Any] = {
        **stacked({n: p.detach() for n, p in model.named_parameters()}, model.config.num_layers),
        **_optimizer_tensors(model, optimizer),
        COMMON: buffer,
    }
    (directory / "metadata.json").unlink(missing_ok=True)
    with _single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
    meta = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    (directory / "metadata.json").write_text(json.dumps(meta))
    tracker = Path(save_dir) / TRACKER
    tracker.with_suffix(".tmp").write_text(str(iteration))
    os.replace(tracker.with_suffix(".tmp"), tracker)
    return directory


def latest(load_dir: str | Path) -> int | None:
    try:
        text = (Path(load_dir) / TRACKER).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def load(
    load_dir: str | Path, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore the model (and optimizer moments when given) from checkpoint `iteration`; returns
    the common state (args, iteration, scheduler, ...)."""
    directory = iteration_dir(load_dir, iteration)
    layers = model.config.num_layers
    params = dict(model.named_parameters())
    state: dict[str, Any] = {k: torch.empty_like(v) for k, v in stacked(params, layers).items()}
    if optimizer is not None:
        state.update((k, torch.empty_like(v)) for k, v in _optimizer_tensors_like(model).items())
    state[COMMON] = io.BytesIO()
    with _single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    common_bytes = state.pop(COMMON)
    common_bytes.seek(0)
    common = torch.load(common_bytes, weights_only=False)[0]  # our own file: args are a Namespace
    with torch.no_grad():
        for name, tensor in unstacked({k: v for k, v in state.items() if not k.startswith("optimizer.")}).items():
            params[name].copy_(tensor)
    if optimizer is not None:
        _restore_moments(model, optimizer, state, common.get("optimizer_step", iteration))
    return common


def _optimizer_tensors_like(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = {n: p.detach() for n, p in model.named_parameters()}
    layers = model.config.num_layers
    return {
        f"optimizer.state.{key}.{name}": tensor
        for key in ("exp_avg", "exp_avg_sq")
        for name, tensor in stacked(named, layers).items()
    }


def _restore_moments(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], step: int
) -> None:
    for key in ("exp_avg", "exp_avg_sq"):
        prefix = f"optimizer.state.{key}."
        moments = unstacked({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        for name, param in model.named_parameters():
            slot = optimizer.state[param]
            slot[key] = moments[name].clone()
            slot["step"] = torch.tensor(float(step))
