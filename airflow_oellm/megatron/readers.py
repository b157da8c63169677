"""Read a Megatron checkpoint's model tensors one at a time, as global (unsharded) tensors.

Both readers answer the same questions under torch_dist's parameter names (`decoder.layers.` +
suffix for the per-layer ones, addressed with a layer number): which names exist, a tensor's
shape, and the tensor itself with tensor parallelism undone and pipeline stages mapped to global
layer numbers. Nothing beyond the requested tensor is kept, except the legacy reader's current
pipeline stage (its rank files are memory-mapped).

torch_dist: `.metadata` gives every stored chunk's global offset and its byte range in a .distcp
file; each chunk is one `torch.save`d tensor (one layer x one TP shard for stacked layer tensors),
so reading a layer reads only its own chunks. Legacy torch: one pickle per (TP, PP) rank with
per-stage layer numbers and TP slices that are concatenated by the rules of megatron-core's
parallel linear layers.
"""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterable
from typing import Any

import torch

from airflow_oellm.megatron.layout import CheckpointLayout
from airflow_oellm.megatron.unpickle import load_distcp_metadata, load_torch_pickle

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
LAYER_PREFIX = "decoder.layers."
# per-layer suffixes (torch_dist / Transformer Engine names)
INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV = "self_attention.linear_qkv.weight"
Q_NORM = "self_attention.q_layernorm.weight"
K_NORM = "self_attention.k_layernorm.weight"
ATTENTION_OUT = "self_attention.linear_proj.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"

# the local (non-TE) spec's names in legacy files
_LEGACY_SUFFIXES = {"input_layernorm.weight": INPUT_NORM, "pre_mlp_layernorm.weight": MLP_NORM}
_LOCAL_SUFFIXES = {v: k for k, v in _LEGACY_SUFFIXES.items()}
_TP_ROWS = {EMBEDDING, OUTPUT_LAYER, QKV}  # column-parallel: TP shards stacked on dim 0
_TP_COLUMNS = {ATTENTION_OUT, FC2}  # row-parallel: TP shards side by side on dim 1
_LEGACY_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class CheckpointReadError(ValueError):
    """The checkpoint's files do not hold what its metadata or arguments promise."""


class CheckpointReader:
    """Common interface; see the module doc."""

    args: argparse.Namespace
    common: dict[str, Any]

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """Global shape; for a layer suffix, one layer's."""
        raise NotImplementedError

    def read(self, name: str, layer: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and mapped memory."""


def _args_of(common: Any, where: str) -> tuple[dict[str, Any], argparse.Namespace]:
    if isinstance(common, list) and len(common) == 1:  # the .distcp item wraps the dict in a list
        common = common[0]
    if not isinstance(common, dict) or not isinstance(common.get("args"), argparse.Namespace):
        raise CheckpointReadError(f"{where} holds no Megatron training arguments (`args`)")
    return common, common["args"]


class TorchDistReader(CheckpointReader):
    def __init__(self, layout: CheckpointLayout) -> None:
        self.directory = layout.directory
        metadata = load_distcp_metadata(layout.directory / ".metadata")
        keys = metadata.state_dict_metadata
        prefix = "model." if EMBEDDING not in keys and f"model.{EMBEDDING}" in keys else ""
        self._tensors = {
            k[len(prefix) :]: (k, v) for k, v in keys.items() if k.startswith(prefix) and hasattr(v, "chunks")
        }
        self._storage = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
        self._files: dict[str, Any] = {}
        if layout.common_file is not None:
            self.common, self.args = _args_of(load_torch_pickle(layout.common_file), str(layout.common_file))
        else:
            items = [k for k, v in keys.items() if k.startswith("common_state") and not hasattr(v, "chunks")]
            if not items:
                raise CheckpointReadError(f"{self.directory} has neither common.pt nor a common_state item")
            self.common, self.args = _args_of(
                load_torch_pickle(self._bytes(items[0], ())), f"{self.directory}:{items[0]}"
            )

    def _name(self, name: str, layer: int | None) -> tuple[str, bool]:
        """Stored key and whether it is stacked over layers (per-layer keys also occur)."""
        if layer is None:
            return name, False
        stacked = LAYER_PREFIX + name
        if stacked in self._tensors:
            return stacked, True
        return f"{LAYER_PREFIX}{layer}.{name}", False

    def has(self, name: str) -> bool:
        return (
            (LAYER_PREFIX + name) in self._tensors
            or name in self._tensors
            or f"{LAYER_PREFIX}0.{name}" in self._tensors
        )

    def shape(self, name: str) -> tuple[int, ...]:
        layer = None if name in self._tensors else 0
        key, stacked = self._name(name, layer)
        size = tuple(self._entry(key)[1].size)
        return size[1:] if stacked else size

    def _entry(self, key: str) -> tuple[str, Any]:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointReadError(f"{self.directory} has no tensor {key}") from None

    def _bytes(self, fqn: str, offsets: tuple[int, ...]) -> bytes:
        info = self._storage.get((fqn, offsets))
        if info is None:
            raise CheckpointReadError(f"{self.directory}/.metadata lists no storage for {fqn} at {offsets}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointReadError(
                f"{fqn} is stored with transforms {info.transform_descriptors} (compressed?); not supported"
            )
        handle = self._files.get(info.relative_path)
        if handle is None:
            handle = self._files[info.relative_path] = (self.directory / info.relative_path).open("rb")
        handle.seek(info.offset)
        data = handle.read(info.length)
        if len(data) != info.length:
            raise CheckpointReadError(f"{self.directory}/{info.relative_path} is truncated (reading {fqn})")
        return data

    def read(self, name: str, layer: int | None = None) -> torch.Tensor:
        key, stacked = self._name(name, layer)
        stored_key, meta = self._entry(key)
        size = tuple(meta.size)
        shape = size[1:] if stacked else size
        out = torch.empty(shape, dtype=meta.properties.dtype)
        filled = 0
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if stacked and not offsets[0] <= layer < offsets[0] + sizes[0]:
                continue
            data = torch.load(io.BytesIO(self._bytes(stored_key, offsets)), map_location="cpu", weights_only=True)
            data = data.reshape(sizes)
            if stacked:
                data, offsets, sizes = data[layer - offsets[0]], offsets[1:], sizes[1:]
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] = data
            filled += data.numel()
        if filled != out.numel():
            raise CheckpointReadError(f"{self.directory}: the stored chunks of {key} do not cover its shape {shape}")
        return out

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class LegacyReader(CheckpointReader):
    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self._stage: int | None = None
        self._stage_dicts: list[dict[str, Any]] = []
        # per pipeline stage: its number of layers and the names it holds (layer numbers restart per stage)
        self.layers_per_stage: list[int] = []
        self._names_by_stage: list[set[str]] = []
        self._keys_by_stage: list[set[str]] = []
        for pp in range(layout.pipeline_parallel):
            top = self._load(0, pp)
            if pp == 0:
                self.common, self.args = _args_of(top, str(layout.rank_files[(0, 0)]))
            numbers = {int(m.group(1)) for k in top["model"] if (m := _LEGACY_LAYER_KEY.match(k))}
            self.layers_per_stage.append(max(numbers) + 1 if numbers else 0)
            self._names_by_stage.append(self._canonical_names(top["model"]))
            self._keys_by_stage.append(set(top["model"]))

    def _load(self, tp: int, pp: int) -> dict[str, Any]:
        path = self.layout.rank_files[(tp, pp)]
        top = load_torch_pickle(path, mmap=True)
        if not isinstance(top, dict) or "model" not in top:
            virtual = isinstance(top, dict) and "model0" in top
            why = "a virtual-pipeline checkpoint (model0, model1, ...)" if virtual else "no `model` state dict"
            raise CheckpointReadError(f"{path} holds {why}; convert its torch_dist version instead")
        return top

    @staticmethod
    def _canonical_names(model: Iterable[str]) -> set[str]:
        names = set()
        for key in model:
            if key.endswith("_extra_state"):
                continue
            match = _LEGACY_LAYER_KEY.match(key)
            names.add(_LEGACY_SUFFIXES.get(match.group(2), match.group(2)) if match else key)
        return names

    def _use_stage(self, pp: int) -> list[dict[str, Any]]:
        if self._stage != pp:
            self._stage_dicts = []  # drop the previous stage's mapped files first
            self._stage_dicts = [self._load(tp, pp)["model"] for tp in range(self.layout.tensor_parallel)]
            self._stage = pp
        return self._stage_dicts

    def _place(self, name: str, layer: int | None) -> tuple[int, str]:
        """(pipeline stage, key in that stage's files)."""
        if layer is None:
            stage = 0 if name == EMBEDDING else len(self.layers_per_stage) - 1
            return stage, name
        first = 0
        for stage, count in enumerate(self.layers_per_stage):
            if layer < first + count:
                local = layer - first
                key = f"{LAYER_PREFIX}{local}.{name}"
                if key not in self._keys_by_stage[stage]:  # the local spec's name
                    key = f"{LAYER_PREFIX}{local}.{_LOCAL_SUFFIXES.get(name, name)}"
                return stage, key
            first += count
        raise CheckpointReadError(f"{self.layout.directory} has {first} layers; layer {layer} asked for")

    def has(self, name: str) -> bool:
        return any(name in names for names in self._names_by_stage)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(
            self.read(name, None if name.startswith(("embedding.", "output_layer.", "decoder.final")) else 0).shape
        )

    def read(self, name: str, layer: int | None = None) -> torch.Tensor:
        stage, key = self._place(name, layer)
        shards = []
        for tp, model in enumerate(self._use_stage(stage)):
            tensor = model.get(key)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointReadError(f"{self.layout.rank_files[(tp, stage)]} has no tensor {key}")
            shards.append(tensor)
        return merge_tensor_parallel(name, shards)

    def close(self) -> None:
        self._stage_dicts = []
        self._stage = None


def merge_tensor_parallel(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """One global tensor from its TP shards, by the parallel-linear layer kind behind `name`."""
    if len(shards) == 1:
        return shards[0]
    if name == FC1:  # each rank holds [gate_r; up_r]: all gate halves, then all up halves
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
    if name in _TP_ROWS:
        return torch.cat(shards, dim=0)
    if name in _TP_COLUMNS:
        return torch.cat(shards, dim=1)
    return shards[0]  # replicated (norms)


def open_checkpoint(layout: CheckpointLayout) -> CheckpointReader:
    return TorchDistReader(layout) if layout.format == "torch_dist" else LegacyReader(layout)
