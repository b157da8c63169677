"""Write safetensors files tensor by tensor, so memory holds about one tensor at a time.

Every output tensor's name, dtype and shape is known before any data is read, so each file's
header (8-byte little-endian length, JSON name -> dtype/shape/byte range, space-padded to 8 bytes)
is written first and the tensors are then produced, written and dropped in header order. Shard
boundaries are planned from the sizes; with more than one shard `model.safetensors.index.json`
maps names to files, as `transformers` expects.

A produced tensor is written in row-major order, piece by contiguous piece, without a copy; a piece
whose bytes lie unchanged in a source file (a view of a memory-mapped checkpoint) is copied file to
file by the kernel (`copy_file_range`, what `cp` uses).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
        return math.prod(self.shape) * self.dtype.itemsize


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


SourceRange = Callable[[torch.Tensor], "tuple[int, int] | None"]
_SMALL = 1 << 20  # below this a strided piece is simply copied


def _produced(tensor: OutputTensor) -> torch.Tensor:
    data = tensor.produce()
    if data.numel() != math.prod(tensor.shape) or (data.dim() and data.shape[-1] != tensor.shape[-1]):
        raise ValueError(f"{tensor.name}: produced shape {tuple(data.shape)}, planned {tensor.shape}")
    return data.to(tensor.dtype)


def _pieces(data: torch.Tensor) -> Iterator[torch.Tensor]:
    """Contiguous tensors whose bytes, one after the other, are `data` in row-major order."""
    if data.is_contiguous():
        yield data
    elif data.dim() <= 1 or data.numel() * data.element_size() < _SMALL:
        yield data.contiguous()
    else:
        for part in data:
            yield from _pieces(part)


def _write_all(out: BinaryIO, view: memoryview) -> None:
    while view:  # an unbuffered write may take only part
        view = view[out.write(view) :]


def _write_memory(out: BinaryIO, piece: torch.Tensor) -> None:
    # the tensor's own memory as bytes: no second copy as `tobytes()` would make
    _write_all(out, memoryview(piece.reshape(-1).view(torch.uint8).numpy()))


def _copy_file_range(source: int, offset: int, out: BinaryIO, nbytes: int) -> bool:
    """Kernel copy of source[offset:offset+nbytes] to out's position; False if unsupported here."""
    done = 0
    while done < nbytes:
        try:
            step = os.copy_file_range(source, out.fileno(), nbytes - done, offset + done)
        except OSError:
            if done:
                raise
            return False
        if step == 0:
            raise OSError(f"source file ended {nbytes - done} bytes early")
        done += step
    return True


def write_file(path: Path, tensors: list[OutputTensor], source_range: SourceRange | None = None) -> int:
    """One safetensors file; returns its data bytes. `source_range(piece)`: (fd, offset) of a
    piece's bytes in a file, or None."""
    with path.open("wb", buffering=0) as out:
        _write_all(out, memoryview(_header(tensors)))
        for tensor in tensors:
            data = _produced(tensor)
            for piece in _pieces(data):
                where = source_range(piece) if source_range else None
                nbytes = piece.numel() * piece.element_size()
                if where is None or not _copy_file_range(where[0], where[1], out, nbytes):
                    _write_memory(out, piece)
            del data
    return sum(t.nbytes for t in tensors)


def shard_names(count: int) -> Iterator[str]:
    if count == 1:
        yield SINGLE_FILE
        return
    for i in range(count):
        yield f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_model(
    directory: Path, tensors: list[OutputTensor], max_shard_bytes: int, source_range: SourceRange | None = None
) -> list[str]:
    """The model's safetensors file(s) (+ index when sharded) in `directory`; returns the file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = list(shard_names(len(shards)))
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        total += write_file(directory / name, shard, source_range)
        weight_map.update((t.name, name) for t in shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
