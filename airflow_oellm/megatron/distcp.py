"""The stored items of a torch distributed checkpoint (`*.distcp`), read in place.

Each tensor item is a `torch.save` zip archive at a byte range of a .distcp file; its data is one
uncompressed storage record. The files are memory-mapped and, when an item is stored plainly (one
little-endian storage exactly the size the metadata promises), its tensor is a view of the mapped
file: no copy, and `source_range` tells a writer where its bytes live so it can copy them file to
file in the kernel (`copy_file_range`, as `cp` does). Anything else is deserialised by `torch.load`.
Mapped pages are file-backed; `release` drops them from the process so memory stays flat.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import mmap
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


class CheckpointReadError(ValueError):
    """The checkpoint's files do not hold what its metadata or arguments promise."""


class _Window(io.RawIOBase):
    """A read-only file over mapped[start:start+length], for zipfile (which reads only headers)."""

    def __init__(self, mapped: mmap.mmap, start: int, length: int) -> None:
        self.mapped, self.start, self.length, self.position = mapped, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        end = min(self.position + len(buffer), self.length)
        data = self.mapped[self.start + self.position : self.start + end]
        buffer[: len(data)] = data
        self.position = end
        return len(data)


class ChunkFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, tuple[Any, mmap.mmap, int]] = {}  # path -> (file, mapping, its address)

    def _mapped(self, relative_path: str) -> mmap.mmap:
        entry = self._maps.get(relative_path)
        if entry is None:
            handle = (self.directory / relative_path).open("rb")
            # copy-on-write: a stray in-place write changes private pages, never the checkpoint
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            view = ctypes.c_char.from_buffer(mapped)
            entry = self._maps[relative_path] = (handle, mapped, ctypes.addressof(view))
            del view  # an exported buffer would keep the mapping from closing
        return entry[1]

    def _range(self, info: Any, what: str) -> tuple[mmap.mmap, int, int]:
        if getattr(info, "transform_descriptors", None):
            raise CheckpointReadError(f"{what} is stored with transforms {info.transform_descriptors}; not supported")
        mapped = self._mapped(info.relative_path)
        if info.offset + info.length > len(mapped):
            raise CheckpointReadError(f"{self.directory}/{info.relative_path} is truncated (reading {what})")
        return mapped, info.offset, info.length

    def raw(self, info: Any, what: str) -> bytes:
        mapped, start, length = self._range(info, what)
        return mapped[start : start + length]

    def tensor(self, info: Any, dtype: torch.dtype, sizes: tuple[int, ...], what: str) -> torch.Tensor:
        mapped, start, length = self._range(info, what)
        data_offset = _plain_storage_offset(mapped, start, length, math.prod(sizes) * dtype.itemsize)
        if data_offset is None:  # not a plain storage record: let torch deserialise it
            data = torch.load(io.BytesIO(mapped[start : start + length]), map_location="cpu", weights_only=True)
            return data.reshape(sizes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about buffers it cannot resize; none is
            flat = torch.frombuffer(mapped, dtype=dtype, count=math.prod(sizes), offset=start + data_offset)
        return flat.view(sizes)

    def source_range(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(file descriptor, offset) of a contiguous tensor that is a view of a mapped file."""
        if not tensor.is_contiguous():
            return None
        pointer, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for handle, mapped, base in self._maps.values():
            if base <= pointer and pointer + nbytes <= base + len(mapped):
                return handle.fileno(), pointer - base
        return None

    def release(self) -> None:
        for _, mapped, _ in self._maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        for handle, mapped, _ in self._maps.values():
            with contextlib.suppress(BufferError):  # a tensor still views it: the mapping ends with it
                mapped.close()
            handle.close()
        self._maps.clear()


def _plain_storage_offset(mapped: mmap.mmap, start: int, length: int, nbytes: int) -> int | None:
    """Offset (within the item) of the data of a torch.save archive holding exactly one uncompressed
    little-endian storage of `nbytes`, or None if the item is anything else."""
    try:
        archive = zipfile.ZipFile(_Window(mapped, start, length))
    except zipfile.BadZipFile:
        return None
    with archive:
        entries = archive.infolist()
        storages = [e for e in entries if "/data/" in e.filename and not e.filename.endswith("/")]
        order = [e for e in entries if e.filename.endswith("/byteorder")]
        if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED or storages[0].file_size != nbytes:
            return None
        if order and archive.read(order[0]) != b"little":
            return None
        header = storages[0].header_offset
    signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(mapped, start + header)
    if signature != b"PK\x03\x04":
        return None
    return header + _LOCAL_HEADER.size + name_length + extra_length
