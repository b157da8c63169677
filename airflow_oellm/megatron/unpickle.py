"""Unpickle Megatron checkpoint files without importing megatron and without running their code.

A Megatron pickle (legacy `model_optim_rng.pt`, `common.pt`, the common-state item of newer
torch_dist checkpoints) holds an `argparse.Namespace` of training arguments, megatron-core enums
(`AttnBackend`, `ModelType`, ...) and numpy/python RNG states. `torch.load(weights_only=True)`
refuses every such global; `weights_only=False` would need megatron importable and would execute
whatever the file names. Instead each global the file needs, except `argparse.Namespace`, is
registered as an inert `StandIn` class under its own name: it records its constructor arguments
and state and nothing else, so no code from the file runs.

The distributed checkpoint's `.metadata` is a plain pickle of torch dataclasses: it is read with
an unpickler that allows only those classes. It first maps them to plain records that hold the same
fields, because importing torch.distributed.checkpoint costs ~0.8 s (DTensor, sympy) per process;
if the records do not come out as expected (another torch's pickle), the real classes are used.
"""

from __future__ import annotations

import argparse
import enum
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals


class UnsafeCheckpointError(ValueError):
    """The file names something torch refuses to load even as a stand-in (`os`, `sys`, ...)."""


class StandIn:
    """Placeholder for a class or function a checkpoint names; inert by construction."""

    stands_for = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """An enum member's value (enums pickle as `EnumClass(value)`)."""
        return self.args[0] if len(self.args) == 1 else self.args

    def __repr__(self) -> str:
        return f"<{self.stands_for}{self.args!r}>"


# harmless classes loaded as themselves: the training arguments, and the buffer torch's own
# distributed-checkpoint writer pickles when given one as a bytes item
_ALLOWED_AS_IS = {"argparse.Namespace": argparse.Namespace, "_io.BytesIO": io.BytesIO}


def _stand_in(qualified: str) -> type[StandIn]:
    module, _, name = qualified.rpartition(".")
    return type(name, (StandIn,), {"__module__": module, "stands_for": qualified})


def load_torch_pickle(source: Path | bytes, *, mmap: bool = False) -> Any:
    """`torch.load` of a Megatron file (path or bytes) with stand-ins for every non-torch global."""
    opened: Path | BinaryIO = source if isinstance(source, Path) else io.BytesIO(source)
    names = get_unsafe_globals_in_checkpoint(opened)
    if not isinstance(opened, Path):
        opened.seek(0)
    allowed: list[Any] = [_ALLOWED_AS_IS[name] if name in _ALLOWED_AS_IS else (_stand_in(name), name) for name in names]
    try:
        with safe_globals(allowed):
            return torch.load(opened, map_location="cpu", weights_only=True, mmap=mmap and isinstance(opened, Path))
    except pickle.UnpicklingError as exc:
        where = source if isinstance(source, Path) else "a checkpoint item"
        reason = str(exc).split("\n\n")[-2].strip() if "\n\n" in str(exc) else str(exc)
        raise UnsafeCheckpointError(f"refusing to load {where}: {reason}") from None


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


# harmless value types .metadata may hold (torch writers record the checkpoint path as a Path)
_PLAIN_VALUES = {
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _Record:
    """Fields of a torch.distributed.checkpoint dataclass (or an enum's value) as attributes."""

    offset: Any = None  # fields that torch leaves out of the pickle when they hold their default
    index: Any = None
    transform_descriptors: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")
        self.__dict__.update(state)


class _TensorProperties(_Record):
    def __setstate__(self, state: Any) -> None:  # torch pickles (dtype, layout, requires_grad, ...)
        if isinstance(state, tuple) and state and isinstance(state[0], torch.dtype):
            self.dtype = state[0]
        else:
            super().__setstate__(state)


_RECORDS: dict[str, type] = {}


def _record(name: str) -> type:
    if name not in _RECORDS:
        _RECORDS[name] = type(name, (_TensorProperties if name == "TensorProperties" else _Record,), {})
    return _RECORDS[name]


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, records: bool) -> None:
        super().__init__(file)
        self.records = records

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES and not name.startswith("__"):
            return _record(name) if self.records else super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in _PLAIN_VALUES:  # torch's own writer records its checkpoint path
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):  # newer Pythons pickle enum members as getattr(cls, name)
            return _enum_member
        if module.split(".")[0] == "megatron":  # older megatron-core pickled its own planner data
            return _stand_in(f"{module}.{name}")
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")


def _enum_member(owner: Any, name: Any) -> Any:
    """`getattr` restricted to a public member of a class this unpickler allowed."""
    if not isinstance(owner, type) or not isinstance(name, str) or name.startswith("_"):
        raise pickle.UnpicklingError(f"refusing getattr({owner!r}, {name!r}) in a checkpoint's .metadata")
    if issubclass(owner, _Record):
        member = owner(name)
        member.name = name
        return member
    if owner.__module__ in _METADATA_MODULES and issubclass(owner, enum.Enum):
        return owner[name]
    raise pickle.UnpicklingError(f"refusing getattr({owner.__qualname__}, {name!r}) in a checkpoint's .metadata")


def _usable(metadata: Any) -> bool:
    try:
        for value in metadata.state_dict_metadata.values():
            if hasattr(value, "chunks"):
                assert isinstance(value.properties.dtype, torch.dtype) and isinstance(tuple(value.size), tuple)
                assert all(len(c.offsets) == len(c.sizes) for c in value.chunks)
        for index, info in metadata.storage_data.items():
            assert isinstance(index.fqn, str) and isinstance(info.relative_path, str)
            assert isinstance(info.offset, int) and isinstance(info.length, int)
    except (AttributeError, AssertionError, TypeError):
        return False
    return True


def load_distcp_metadata(path: Path) -> Any:
    """The checkpoint metadata pickled in `<checkpoint>/.metadata`: state_dict_metadata (key ->
    size, dtype, chunks) and storage_data (chunk -> file, byte offset, length)."""
    data = path.read_bytes()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), records=True).load()
        if _usable(metadata):
            return metadata
    except pickle.UnpicklingError as exc:
        if "refusing" in str(exc):
            raise
    return _MetadataUnpickler(io.BytesIO(data), records=False).load()
