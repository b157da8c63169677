"""Evaluate a converted (HuggingFace) checkpoint offline and write one results JSON
(`airflow-oellm evaluate`).

Tasks: `perplexity` is built in (transformers only, on a text file). Any other name is an
lm-evaluation-harness task (the optional `lm-eval` extra), e.g. a local YAML task found through
`--include-path`; its numeric metrics are reported as `<task>.<metric>`. Nothing is fetched from a
hub: the model, tokenizer, text and task data are local files.

The JSON (written atomically) holds the iteration, the tasks, flat `metrics` (what the DAG's
report tabulates), per-task `details`, the model's architecture/size/dtype and timings.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow_oellm import __version__
from airflow_oellm.evaluation.perplexity import DEFAULT_TEXT

PERPLEXITY = "perplexity"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (missing model, tokenizer, text or task support)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _load(hf_dir: Path, tokenizer_dir: Path | None, dtype: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (hf_dir / "config.json").is_file():
        raise EvaluationError(f"{hf_dir} is no HuggingFace model directory (no config.json)")
    source = tokenizer_dir or hf_dir
    if not any((source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise EvaluationError(
            f"{source} has no tokenizer files: keep the training tokenizer with the checkpoint "
            "(Megatron-LM saves it into iter_N/tokenizer/) or pass --tokenizer DIR"
        )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype) if dtype != "auto" else "auto", local_files_only=True
    )
    return model.to(device).eval(), tokenizer


def _lm_eval(model: Any, tokenizer: Any, tasks: list[str], include_path: Path | None, batch_size: int) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvaluationError(
            f"tasks {', '.join(tasks)} need lm-evaluation-harness: pip install 'airflow-oellm[lm-eval]'"
        ) from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (searched {include_path} and lm-eval's own)" if include_path else " (pass --include-path DIR)"
        raise EvaluationError(f"unknown evaluation task(s) {', '.join(unknown)}{where}")
    output = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=manager,
        log_samples=False,
    )
    return output["results"]


def _flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": 0.5, "acc_stderr,none": ..., "sample_len": 20}} ->
    {"task.acc": 0.5, "task.acc_stderr": ...}: metrics are the `metric,filter` keys."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{task}.{key.split(',')[0]}"] = value
    return flat


def evaluate(
    hf_dir: str | Path,
    output_file: str | Path,
    *,
    tasks: Sequence[str] = (PERPLEXITY,),
    iteration: int | None = None,
    text_file: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    include_path: str | Path | None = None,
    window: int = 1024,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str = "auto",
) -> dict[str, Any]:
    """Run `tasks` on the model in `hf_dir`; write and return the results document."""
    os.environ.update(OFFLINE)
    started_at, started = _now(), time.monotonic()
    hf_dir = Path(hf_dir)
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise EvaluationError("no evaluation tasks given")
    text_path = Path(text_file) if text_file else DEFAULT_TEXT
    if PERPLEXITY in tasks and not text_path.is_file():
        raise EvaluationError(f"perplexity text file {text_path} does not exist")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = _load(hf_dir, Path(tokenizer_dir) if tokenizer_dir else None, dtype, device)
    timings = {"load_seconds": round(time.monotonic() - started, 3)}
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    if PERPLEXITY in tasks:
        from airflow_oellm.evaluation.perplexity import perplexity

        limit = getattr(model.config, "max_position_embeddings", window) or window
        result = perplexity(model, tokenizer, text_path.read_text(encoding="utf-8"), window=min(window, limit))
        metrics.update({k: v for k, v in result.metrics().items() if k != "tokens"})
        details[PERPLEXITY] = {**result.__dict__, "text_file": str(text_path), "window": min(window, limit)}
        timings["perplexity_seconds"] = result.seconds
    harness_tasks = [t for t in tasks if t != PERPLEXITY]
    if harness_tasks:
        began = time.monotonic()
        results = _lm_eval(model, tokenizer, harness_tasks, Path(include_path) if include_path else None, batch_size)
        metrics.update(_flat_metrics(results))
        details.update(results)
        timings["lm_eval_seconds"] = round(time.monotonic() - began, 3)
    timings["total_seconds"] = round(time.monotonic() - started, 3)
    document = {
        "iteration": iteration,
        "hf_dir": str(hf_dir.absolute()),
        "tasks": tasks,
        "metrics": metrics,
        "details": details,
        "model": {
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": device,
        },
        "timings": timings,
        "started_at": started_at,
        "finished_at": _now(),
        "host": socket.gethostname(),
        "evaluator_version": __version__,
    }
    target = Path(output_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(staging, target)
    return document
