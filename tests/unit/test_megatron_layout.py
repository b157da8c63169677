"""Finding a Megatron checkpoint's files: tracker, iteration, torch_dist vs legacy TP x PP layouts,
and clear refusals for incomplete or unsupported ones (file layouts as megatron-core writes them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from airflow_oellm.megatron.layout import CheckpointLayoutError, locate, read_tracker

pytestmark = pytest.mark.convert


def torch_dist(save: Path, iteration: int, common: bool = False, meta: dict | None = None) -> Path:
    d = save / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x")
    (d / ".metadata").write_bytes(b"x")
    (d / "metadata.json").write_text(
        json.dumps(meta or {"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    if common:
        (d / "common.pt").write_bytes(b"x")
    return d


def legacy(save: Path, iteration: int, tp: int, pp: int, skip: tuple[int, int] | None = None) -> Path:
    d = save / f"iter_{iteration:07d}"
    for t in range(tp):
        for p in range(pp):
            if (t, p) == skip:
                continue
            rank = d / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            rank.mkdir(parents=True)
            (rank / "model_optim_rng.pt").write_bytes(b"x")
    return d


def test_tracker_picks_the_iteration(tmp_path):
    torch_dist(tmp_path, 500)
    torch_dist(tmp_path, 1000, common=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1000\n")
    layout = locate(tmp_path)
    assert (layout.iteration, layout.format, layout.directory.name) == (1000, "torch_dist", "iter_0001000")
    assert layout.common_file == layout.directory / "common.pt"  # megatron-core 0.16 style
    older = locate(tmp_path, 500)
    assert older.iteration == 500 and older.common_file is None  # 0.19 keeps it inside the .distcp


def test_an_iteration_directory_can_be_given_directly(tmp_path):
    d = torch_dist(tmp_path, 20)
    assert locate(d).iteration == 20 and locate(d, 20).directory == d
    with pytest.raises(CheckpointLayoutError, match="holds iteration 20, not 30"):
        locate(d, 30)


def test_release_checkpoint(tmp_path):
    (tmp_path / "release" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"x")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    layout = locate(tmp_path)
    assert layout.iteration is None and layout.format == "torch" and layout.directory.name == "release"


def test_legacy_tp_pp_grid(tmp_path):
    legacy(tmp_path, 10, tp=2, pp=2)
    layout = locate(tmp_path, 10)
    assert (layout.format, layout.tensor_parallel, layout.pipeline_parallel) == ("torch", 2, 2)
    assert layout.rank_files[(1, 1)].parent.name == "mp_rank_01_001"
    assert sorted(layout.rank_files) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    legacy(tmp_path, 20, tp=2, pp=1)
    assert locate(tmp_path, 20).rank_files[(1, 0)].parent.name == "mp_rank_01"


@pytest.mark.parametrize(
    ("build", "iteration", "fragment"),
    [
        (lambda s: None, None, "no latest_checkpointed_iteration.txt"),
        (lambda s: torch_dist(s, 5), None, "it has iter_0000005: pass --iteration"),
        (lambda s: (s / "latest_checkpointed_iteration.txt").write_text("garbage"), None, "not an iteration"),
        (lambda s: torch_dist(s, 5), 6, "has no checkpoint iter_0000006"),
        (lambda s: legacy(s, 5, tp=2, pp=2, skip=(1, 0)), 5, "lacks mp_rank_01_000 of a TP=2 x PP=2 layout"),
        (lambda s: legacy(s, 5, tp=1, pp=1) / "mp_rank_00_000_001" / "x", 5, None),
        (
            lambda s: torch_dist(s, 5, meta={"sharded_backend": "lmdb"}),
            5,
            "metadata.json names sharded_backend 'lmdb', no format Megatron writes",
        ),
        (
            lambda s: (s / "iter_0000005").mkdir() or (s / "iter_0000005" / "__0_0.distcp").write_bytes(b""),
            5,
            "is incomplete: no .metadata yet",
        ),
        (
            lambda s: (s / "iter_0000005").mkdir(),
            5,
            "holds no Megatron checkpoint (torch, torch_dist, torch_dcp, zarr)",
        ),
    ],
)
def test_refusals_name_the_problem(tmp_path, build, iteration, fragment):
    target = build(tmp_path)
    if fragment is None:  # an expert-parallel rank directory: MoE
        target.parent.mkdir(parents=True)
        (target.parent / "model_optim_rng.pt").write_bytes(b"x")
        fragment = "expert-parallel rank; MoE checkpoints cannot be converted"
    with pytest.raises(CheckpointLayoutError, match=re.escape(fragment)):
        locate(tmp_path, iteration)


def test_read_tracker(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("  42 \n")
    assert read_tracker(tmp_path) == 42


def dcp(save: Path, iteration: int) -> Path:
    """What torch.distributed.checkpoint writes (megatron-core's torch_dcp and fsdp_dtensor): no metadata.json."""
    d = save / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x")
    (d / ".metadata").write_bytes(b"x")
    return d


def test_every_format_megatron_writes_is_named(tmp_path):
    from airflow_oellm.megatron.layout import CheckpointLayoutError, convertible

    torch_dist(tmp_path / "dist", 5, common=True)
    legacy(tmp_path / "legacy", 5, tp=1, pp=1)
    torch_dist(tmp_path / "zarr", 5, meta={"sharded_backend": "zarr", "sharded_backend_version": 1})
    dcp(tmp_path / "dcp", 5)
    bridge = torch_dist(tmp_path / "bridge", 5)
    (bridge / "run_config.yaml").write_text("model: {}\n")
    (bridge / "train_state.pt").write_bytes(b"x")
    formats = {name: locate(tmp_path / name, 5).format for name in ("dist", "legacy", "zarr", "dcp", "bridge")}
    assert formats == {
        "dist": "torch_dist",
        "legacy": "torch",
        "zarr": "zarr",
        "dcp": "torch_dcp",
        "bridge": "torch_dist",
    }
    # the same files, told apart by the run's --ckpt-format
    assert locate(tmp_path / "dcp", 5, hint="fsdp_dtensor").format == "fsdp_dtensor"
    assert locate(tmp_path / "bridge", 5).producer == "megatron-bridge"
    assert convertible(locate(tmp_path / "dist", 5)).format == "torch_dist"
    assert convertible(locate(tmp_path / "legacy", 5)).format == "torch"
    for name, hint, words in [
        ("zarr", None, "is a zarr checkpoint, which this converter does not read (it reads torch_dist and torch); "),
        ("dcp", None, "is a torch_dcp checkpoint"),
        ("dcp", "fsdp_dtensor", "is a fsdp_dtensor checkpoint"),
        ("bridge", None, "is a Megatron-Bridge checkpoint (run_config.yaml)"),
    ]:
        with pytest.raises(CheckpointLayoutError, match=re.escape(words)) as refused:
            convertible(locate(tmp_path / name, 5, hint=hint))
        if name != "bridge":
            assert "--ckpt-convert-format torch_dist --ckpt-convert-save" in str(refused.value)


def test_a_torch_dcp_checkpoint_is_ready_once_the_tracker_names_it(tmp_path):
    from airflow_oellm.megatron import checkpoints
    from tests.unit.test_monitor import run_probe

    dcp(tmp_path, 500)
    assert checkpoints.ready(run_probe(tmp_path), str(tmp_path), 500) is None  # the tracker is not there yet
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("500")
    assert checkpoints.ready(run_probe(tmp_path), str(tmp_path), 500).format == "torch_dcp"


def test_a_sweep_that_trains_in_a_format_the_converter_refuses_is_refused_before_it_runs(write, project):
    from airflow_oellm.config import ConfigError, load_sweep

    path = write("config/sweeps/f.yaml", "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /r}\n")
    for fmt in ("torch_dcp", "fsdp_dtensor", "zarr"):
        with pytest.raises(ConfigError, match=rf"backend\.args\.ckpt_format: the converter does not read {fmt}"):
            load_sweep(path, [f"backend.args.ckpt_format={fmt}"])
        # without conversions, any format Megatron writes is fine
        assert load_sweep(path, [f"backend.args.ckpt_format={fmt}", "conversion.enabled=false"]).experiments
    assert load_sweep(path, ["backend.args.ckpt_format=torch_dist"]).experiments
