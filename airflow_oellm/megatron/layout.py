"""Which files make up one Megatron checkpoint, and in which format (no tensor is read here).

A converter is given Megatron's save directory (or one `iter_NNNNNNN/` inside it) and maybe an
iteration; without one, `latest_checkpointed_iteration.txt` picks it (an integer, or `release`
for `<save>/release/`). The formats, as megatron-core writes them (docs/megatron-versions.md):
- `torch` (legacy, the default up to core 0.8): `mp_rank_TT[_PPP]/model_optim_rng.pt`, one per
  tensor- and pipeline-parallel rank;
- `torch_dist` (0.9+ default): `.metadata` + `metadata.json` (written last, `sharded_backend:
  torch_dist`) + `*.distcp`, the common state in `common.pt` (written up to core 0.18) or inside the
  .distcp (0.19);
- `zarr` (up to 0.15): `metadata.json` with `sharded_backend: zarr`;
- `torch_dcp` (0.12+) and `fsdp_dtensor` (0.14+, Megatron-FSDP): plain torch.distributed.checkpoint,
  `.metadata` + `*.distcp` and no `metadata.json`; the same files, told apart only by the run's
  `--ckpt-format` (`hint`).
Megatron-Bridge writes torch_dist with its own `run_config.yaml` and `train_state.pt` beside it.
The converter reads `torch` and `torch_dist` (Megatron-LM's); the others are named and refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from airflow_oellm.megatron.checkpoints import TRACKER_FILE, iteration_dir

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
MODEL_FILE = "model_optim_rng.pt"


class CheckpointLayoutError(ValueError):
    """The directory is no complete Megatron checkpoint this tool can read; the message says why."""


Format = Literal["torch_dist", "torch", "zarr", "torch_dcp", "fsdp_dtensor"]
CONVERTIBLE = ("torch_dist", "torch")
BRIDGE_FILES = ("run_config.yaml", "train_state.pt")  # Megatron-Bridge's own, beside a torch_dist checkpoint
# how to get from a format the converter cannot read to one it can (Megatron's own conversion on load)
RESAVE = (
    "re-save it with Megatron-LM: start a run with --load <this save directory> --ckpt-convert-format torch_dist "
    "--ckpt-convert-save <new directory> (megatron-core 0.9 or later), then convert that"
)


@dataclass(frozen=True)
class CheckpointLayout:
    directory: Path  # iter_NNNNNNN/ or release/
    iteration: int | None  # None for a `release` checkpoint
    format: Format
    producer: Literal["megatron-lm", "megatron-bridge"] = "megatron-lm"
    tensor_parallel: int = 1  # legacy only: torch_dist stores global tensors
    pipeline_parallel: int = 1
    rank_files: dict[tuple[int, int], Path] = field(default_factory=dict)  # legacy: (tp, pp) -> file
    common_file: Path | None = None  # torch_dist: common.pt when this version wrote one


def read_tracker(save_dir: Path) -> int | Literal["release"]:
    path = save_dir / TRACKER_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        found = sorted(p.name for p in save_dir.glob("iter_*"))
        hint = f" (it has {', '.join(found[-3:])}: pass --iteration)" if found else ""
        raise CheckpointLayoutError(f"{save_dir} has no {TRACKER_FILE}{hint}") from None
    if text == "release":
        return "release"
    if not text.isdigit():
        raise CheckpointLayoutError(f"{path} holds {text[:40]!r}, not an iteration")
    return int(text)


def _is_checkpoint_dir(path: Path) -> bool:
    return (
        (path / "metadata.json").exists()
        or (path / ".metadata").exists()
        or any(RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir())
    )


def locate(path: str | Path, iteration: int | None = None, hint: str | None = None) -> CheckpointLayout:
    """The checkpoint at `iteration` (default: the tracker's) under save directory `path`, which
    may also be one checkpoint's own directory. `hint`: the run's `--ckpt-format`, which alone tells
    fsdp_dtensor from torch_dcp. Raises CheckpointLayoutError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointLayoutError(f"{path} is not a directory")
    if _is_checkpoint_dir(path):
        match = re.fullmatch(r"iter_(\d+)", path.name)
        found = int(match.group(1)) if match else None
        if iteration is not None and found is not None and iteration != found:
            raise CheckpointLayoutError(f"{path} holds iteration {found}, not {iteration}")
        return _layout(path, found if found is not None else iteration, hint)
    wanted = read_tracker(path) if iteration is None else iteration
    directory = path / ("release" if wanted == "release" else iteration_dir(int(wanted)))
    if not directory.is_dir():
        raise CheckpointLayoutError(f"{path} has no checkpoint {directory.name}")
    return _layout(directory, None if wanted == "release" else int(wanted), hint)


def _layout(directory: Path, iteration: int | None, hint: str | None) -> CheckpointLayout:
    if (directory / "metadata.json").exists():
        return _sharded(directory, iteration)
    ranks = [(p, RANK_DIR.match(p.name)) for p in sorted(directory.iterdir()) if p.is_dir()]
    ranks = [(p, m) for p, m in ranks if m]
    if ranks:
        return _legacy(directory, iteration, ranks)
    if (directory / ".metadata").exists():
        # torch.distributed.checkpoint writes .metadata last: a complete torch_dcp / fsdp_dtensor checkpoint
        if not any(directory.glob("*.distcp")):
            raise CheckpointLayoutError(f"{directory} is incomplete: .metadata but no *.distcp files")
        return CheckpointLayout(directory, iteration, "fsdp_dtensor" if hint == "fsdp_dtensor" else "torch_dcp")
    if any(directory.glob("*.distcp")):
        raise CheckpointLayoutError(f"{directory} is incomplete: no .metadata yet (still being written?)")
    raise CheckpointLayoutError(f"{directory} holds no Megatron checkpoint (torch, torch_dist, torch_dcp, zarr)")


def _sharded(directory: Path, iteration: int | None) -> CheckpointLayout:
    try:
        meta = json.loads((directory / "metadata.json").read_text())
    except ValueError as exc:
        raise CheckpointLayoutError(f"{directory}/metadata.json is not JSON: {exc}") from None
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    producer = "megatron-bridge" if any((directory / name).exists() for name in BRIDGE_FILES) else "megatron-lm"
    if backend == "zarr":
        return CheckpointLayout(directory, iteration, "zarr", producer)
    if backend != "torch_dist":
        raise CheckpointLayoutError(
            f"{directory}: metadata.json names sharded_backend {backend!r}, no format Megatron writes"
        )
    if not (directory / ".metadata").exists() or not any(directory.glob("*.distcp")):
        raise CheckpointLayoutError(f"{directory} is incomplete: it needs .metadata and *.distcp files")
    common = directory / "common.pt"
    return CheckpointLayout(
        directory, iteration, "torch_dist", producer, common_file=common if common.exists() else None
    )


def convertible(layout: CheckpointLayout) -> CheckpointLayout:
    """The layout if the converter can read it, else the refusal naming its format and what to do."""
    if layout.producer == "megatron-bridge":
        raise CheckpointLayoutError(
            f"{layout.directory} is a Megatron-Bridge checkpoint (run_config.yaml): its model settings are not "
            "Megatron-LM's args; export it with Megatron-Bridge's own HuggingFace export (AutoBridge)"
        )
    if layout.format not in CONVERTIBLE:
        raise CheckpointLayoutError(
            f"{layout.directory} is a {layout.format} checkpoint, which this converter does not read (it reads "
            f"{' and '.join(CONVERTIBLE)}); {RESAVE}"
        )
    return layout


def _legacy(directory: Path, iteration: int | None, ranks: list[tuple[Path, re.Match[str]]]) -> CheckpointLayout:
    files: dict[tuple[int, int], Path] = {}
    for path, match in ranks:
        if match.group(3) is not None:
            raise CheckpointLayoutError(
                f"{directory}: {path.name} is an expert-parallel rank; MoE checkpoints cannot be converted"
            )
        key = (int(match.group(1)), int(match.group(2) or 0))
        if not (path / MODEL_FILE).exists():
            raise CheckpointLayoutError(f"{path} has no {MODEL_FILE} (incomplete checkpoint?)")
        files[key] = path / MODEL_FILE
    tp = max(t for t, _ in files) + 1
    pp = max(p for _, p in files) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        t, p = missing[0]
        name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
        raise CheckpointLayoutError(f"{directory} lacks {name} of a TP={tp} x PP={pp} layout")
    return CheckpointLayout(directory, iteration, "torch", tensor_parallel=tp, pipeline_parallel=pp, rank_files=files)
