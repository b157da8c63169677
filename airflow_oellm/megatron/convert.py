"""Convert one Megatron checkpoint into a HuggingFace model directory (`airflow-oellm convert`).

locate the checkpoint -> read its arguments -> refuse what does not convert faithfully -> plan every
HF tensor -> stream them into safetensors in a temporary sibling directory -> copy the training
tokenizer when the checkpoint carries one -> publish by rename, replacing an earlier conversion.
Readers of the output therefore see either no directory, the previous complete one, or the new
complete one; never a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from airflow_oellm import __version__
from airflow_oellm.megatron import readers as mg
from airflow_oellm.megatron.architecture import DTYPES, ModelType, model_spec
from airflow_oellm.megatron.hf_mapping import hf_tensors
from airflow_oellm.megatron.layout import convertible, locate
from airflow_oellm.megatron.readers import open_checkpoint
from airflow_oellm.megatron.safetensors_stream import parse_size, write_model

PROVENANCE_FILE = "conversion.json"
TOKENIZER_DIR = "tokenizer"  # Megatron-LM saves the training tokenizer into iter_N/tokenizer/


@dataclass(frozen=True)
class ConversionResult:
    output_dir: str
    source: str
    iteration: int | None
    source_format: str
    architecture: str
    dtype: str
    tensors: int
    bytes: int
    files: list[str]
    tokenizer_files: list[str]
    seconds: float
    converter_version: str = __version__


def _publish(staging: Path, target: Path) -> None:
    if target.exists():  # a retried or repeated conversion replaces the earlier one whole
        previous = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, previous)
        os.replace(staging, target)
        shutil.rmtree(previous)
    else:
        os.replace(staging, target)


def _copy_tokenizer(source: Path, staging: Path) -> list[str]:
    if not source.is_dir():
        return []
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != "config.json":  # the model's config is ours
            shutil.copy2(path, staging / path.name)
            copied.append(path.name)
    return copied


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    iteration: int | None = None,
    model_type: ModelType = "auto",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
) -> ConversionResult:
    """Convert `checkpoint` (a save directory or one iter_ directory) into `output_dir`."""
    started = time.monotonic()
    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    layout = convertible(locate(checkpoint, iteration))
    target = Path(output_dir).absolute()
    reader = open_checkpoint(layout)
    try:
        spec = model_spec(reader.args, reader.shape(mg.EMBEDDING)[0], model_type, has_qk_norm=reader.has(mg.Q_NORM))
        if not spec.tied_embeddings and not reader.has(mg.OUTPUT_LAYER):
            raise mg.CheckpointReadError(
                f"{layout.directory}: untie_embeddings_and_output_weights is set but there is no {mg.OUTPUT_LAYER}"
            )
        out_dtype = spec.training_dtype if dtype == "auto" else dtype
        tensors = hf_tensors(spec, reader, getattr(torch, out_dtype))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            files = write_model(staging, tensors, shard_bytes, reader.source_range)
            config = spec.hf_config(out_dtype)
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            tokenizer_files = _copy_tokenizer(layout.directory / TOKENIZER_DIR, staging)
            result = ConversionResult(
                output_dir=str(target),
                source=str(layout.directory),
                iteration=layout.iteration,
                source_format=layout.format,
                architecture=config["architectures"][0],
                dtype=out_dtype,
                tensors=len(tensors),
                bytes=sum(t.nbytes for t in tensors),
                files=files,
                tokenizer_files=tokenizer_files,
                seconds=round(time.monotonic() - started, 3),
            )
            (staging / PROVENANCE_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
            _publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        reader.close()
    return result
