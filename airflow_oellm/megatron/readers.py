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
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch

from airflow_oellm.megatron.distcp import CheckpointReadError, ChunkFiles
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


class CheckpointReader(ABC):
    """Common interface; see the module doc."""

    args: argparse.Namespace
    common: dict[str, Any]

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Global shape; for a layer suffix, one layer's."""

    @abstractmethod
    def read(self, name: str, layer: int | None = None, rows: slice | None = None) -> torch.Tensor:
        """The global tensor (one layer's for a layer suffix), or only `rows` of its first dimension."""

    def source_range(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(file descriptor, offset) holding this tensor's bytes as they are, if it is a view of a file."""
        return None

    @abstractmethod
    def release(self) -> None:
        """Drop mapped file pages read so far from the process (they are read again if needed)."""

    @abstractmethod
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
        self._files = ChunkFiles(layout.directory)
        if layout.common_file is not None:
            self.common, self.args = _args_of(load_torch_pickle(layout.common_file), str(layout.common_file))
        else:
            items = [k for k, v in keys.items() if k.startswith("common_state") and not hasattr(v, "chunks")]
            if not items:
                raise CheckpointReadError(f"{self.directory} has neither common.pt nor a common_state item")
            common = load_torch_pickle(self._bytes(items[0], ()))
            if isinstance(common, io.BytesIO):  # torch's own writer pickles the BytesIO it was given
                common = load_torch_pickle(common.getvalue())
            self.common, self.args = _args_of(common, f"{self.directory}:{items[0]}")

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

    def _info(self, fqn: str, offsets: tuple[int, ...]) -> Any:
        info = self._storage.get((fqn, offsets))
        if info is None:
            raise CheckpointReadError(f"{self.directory}/.metadata lists no storage for {fqn} at {offsets}")
        return info

    def _bytes(self, fqn: str, offsets: tuple[int, ...]) -> bytes:
        return self._files.raw(self._info(fqn, offsets), fqn)

    def read(self, name: str, layer: int | None = None, rows: slice | None = None) -> torch.Tensor:
        """When one stored chunk holds exactly what is asked, a view of the mapped file (no copy)."""
        key, stacked = self._name(name, layer)
        stored_key, meta = self._entry(key)
        size = tuple(meta.size)
        shape = size[1:] if stacked else size
        first, last = (0, shape[0]) if rows is None else (rows.start, rows.stop)
        shape = (last - first, *shape[1:])
        pieces = []
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if stacked:
                if not offsets[0] <= layer < offsets[0] + sizes[0]:
                    continue
                layer_in_chunk, offsets, sizes = layer - offsets[0], offsets[1:], sizes[1:]
            top, bottom = max(offsets[0], first), min(offsets[0] + sizes[0], last)
            if top >= bottom:
                continue
            data = self._files.tensor(self._info(stored_key, tuple(chunk.offsets)), meta.properties.dtype,
                                      tuple(chunk.sizes), stored_key)  # fmt: skip
            if stacked:
                data = data[layer_in_chunk]
            data = data[top - offsets[0] : bottom - offsets[0]]
            pieces.append(((top - first, *offsets[1:]), (bottom - top, *sizes[1:]), data))
        if len(pieces) == 1 and pieces[0][1] == shape:
            return pieces[0][2]
        out = torch.empty(shape, dtype=meta.properties.dtype)
        for offsets, sizes, data in pieces:
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] = data
        if sum(data.numel() for _, _, data in pieces) != out.numel():
            raise CheckpointReadError(f"{self.directory}: the stored chunks of {key} do not cover its shape {shape}")
        return out

    def source_range(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        return self._files.source_range(tensor)

    def release(self) -> None:
        self._files.release()

    def close(self) -> None:
        self._files.close()


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
        layer = None if name in (EMBEDDING, OUTPUT_LAYER, FINAL_NORM) else 0
        shapes = [tuple(shard.shape) for shard in self._shards(name, layer)]
        if len(shapes) == 1 or name not in _TP_ROWS | _TP_COLUMNS | {FC1}:
            return shapes[0]
        dim = 1 if name in _TP_COLUMNS else 0
        return (*shapes[0][:dim], sum(shape[dim] for shape in shapes), *shapes[0][dim + 1 :])

    def _shards(self, name: str, layer: int | None) -> list[torch.Tensor]:
        stage, key = self._place(name, layer)
        shards = []
        for tp, model in enumerate(self._use_stage(stage)):
            tensor = model.get(key)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointReadError(f"{self.layout.rank_files[(tp, stage)]} has no tensor {key}")
            shards.append(tensor)
        return shards

    def read(self, name: str, layer: int | None = None, rows: slice | None = None) -> torch.Tensor:
        merged = merge_tensor_parallel(name, self._shards(name, layer))
        return merged if rows is None else merged[rows]

    def release(self) -> None:
        """Nothing to do: torch maps the rank files; a stage's pages go when the next stage is loaded."""

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
