"""Write safetensors files tensor by tensor, so memory holds about one tensor at a time.

Every output tensor's name, dtype and shape is known before any data is read, so each file's
header (8-byte little-endian length, JSON name -> dtype/shape/byte range, space-padded to 8 bytes)
is written first and the tensors are then produced, written and dropped in header order. Shard
boundaries are planned from the sizes; with more than one shard `model.safetensors.index.json`
maps names to files, as `transformers` expects.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = (
    {"B": 1}
    | {u + "B": 1000 ** (i + 1) for i, u in enumerate("KMGT")}
    | {u + "IB": 1024 ** (i + 1) for i, u in enumerate("KMGT")}
)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int) -> int:
    """Bytes in `5GB`, `512MiB`, `1000000` (HF's max_shard_size spellings)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max shard size {text!r} is not a size like 5GB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Consecutive groups of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(tensors: list[OutputTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _produced(tensor: OutputTensor) -> torch.Tensor:
    data = tensor.produce()
    if tuple(data.shape) != tensor.shape:
        raise ValueError(f"{tensor.name}: produced shape {tuple(data.shape)}, planned {tensor.shape}")
    return data.to(tensor.dtype).contiguous()


def write_file(path: Path, tensors: list[OutputTensor]) -> int:
    """One safetensors file; returns its data bytes."""
    with path.open("wb") as f:
        f.write(_header(tensors))
        for tensor in tensors:
            data = _produced(tensor)
            # the tensor's own memory as bytes: no second copy as `tobytes()` would make
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            del data
    return sum(t.nbytes for t in tensors)


def shard_names(count: int) -> Iterator[str]:
    if count == 1:
        yield SINGLE_FILE
        return
    for i in range(count):
        yield f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_model(directory: Path, tensors: list[OutputTensor], max_shard_bytes: int) -> list[str]:
    """The model's safetensors file(s) (+ index when sharded) in `directory`; returns the file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = list(shard_names(len(shards)))
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        total += write_file(directory / name, shard)
        weight_map.update((t.name, name) for t in shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
