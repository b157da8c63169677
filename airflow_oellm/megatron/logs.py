"""Megatron-LM log lines: the built-in events every training job is watched for.

Formats follow Megatron-LM (and the OpenEuroLLM fork) exactly; every ` key: value |` field of the
iteration line is optional and order-free, lines may carry a `[default0]:` or `0: ` prefix.
"""

from __future__ import annotations

import re
from typing import Any

ITERATION = re.compile(r"\biteration\s+(?P<iteration>\d+)/\s*(?P<train_iters>\d+)\s*\|")
_FIELD = re.compile(r"\|\s*([A-Za-z][A-Za-z0-9 ()/_\-]*?):\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*(?=\|)")
# iteration-line field name -> event field
ITERATION_FIELDS = {
    "consumed samples": "consumed_samples",
    "elapsed time per iteration (ms)": "elapsed_ms",
    "throughput per GPU (TFLOP/s/GPU)": "tflops_per_gpu",
    "Tokens per second per GPU (Tok/s/GPU)": "tokens_per_second_per_gpu",
    "learning rate": "lr",
    "global batch size": "global_batch_size",
    "lm loss": "loss",
    "loss scale": "loss_scale",
    "grad norm": "grad_norm",
    "number of skipped iterations": "skipped_iterations",
    "number of nan iterations": "nan_iterations",
    "mem usages": "mem_usage",
}


def iteration_fields(line: str) -> dict[str, Any]:
    """Numbers of a Megatron iteration line (`iteration 100/ 1000 | ... | lm loss: 3.14E+00 | ...`)."""
    m = ITERATION.search(line)
    if not m:
        return {}
    fields: dict[str, Any] = {"iteration": int(m.group("iteration")), "train_iters": int(m.group("train_iters"))}
    for name, value in _FIELD.findall(line[m.end() - 1 :]):
        key = ITERATION_FIELDS.get(name.strip())
        if key:
            number = float(value)
            fields[key] = (
                int(number)
                if key in ("consumed_samples", "global_batch_size", "skipped_iterations", "nan_iterations")
                else number
            )
    return fields


# (name, regex, metadata): checked on every new line of a job's log
BUILTIN_EVENTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("iteration", ITERATION.pattern, {"kind": "progress"}),
    (
        "validation",
        r"validation loss at iteration\s+(?P<iteration>\d+)(?:\s+on (?P<split>\w+) set)?\s*\|"
        r".*?lm loss value:\s*(?P<loss>[\d.eE+\-]+)(?:.*?lm loss PPL:\s*(?P<ppl>[\d.eE+\-]+))?",
        {"kind": "eval"},
    ),
    (
        "checkpoint_saved",
        r"successfully saved checkpoint from iteration\s+(?P<iteration>\d+) to (?P<path>\S+)",
        {"kind": "checkpoint"},
    ),
    (
        "checkpoint_loaded",
        r"successfully loaded checkpoint from (?P<path>\S+).*?at iteration (?P<iteration>\d+)",
        {"kind": "resume"},
    ),
    ("fresh_start", r"will not load any checkpoints and will start from random", {"kind": "resume"}),
    ("training_done", r"\[after training is done\]", {"kind": "finish"}),
    ("exit_signal", r"\[exiting program after receiving (?P<signal>SIG\w+)\.\]", {"kind": "exit"}),
    ("exit_duration", r"\[exiting program after (?P<minutes>[\d.]+) minutes\]", {"kind": "exit"}),
    ("exit_iteration", r"\[exiting program at iteration (?P<iteration>\d+)\]", {"kind": "exit"}),
    ("cuda_oom", r"CUDA out of memory|OutOfMemoryError|Failed to CUDA calloc", {"kind": "fault"}),
    (
        "nccl_error",
        r"NCCL (?:ERROR|error)|ProcessGroupNCCL.*?(?:timeout|Watchdog caught)|DistBackendError|NCCL WARN NET/IB",
        {"kind": "fault"},
    ),
    (
        "node_failure",
        r"failed on node (?P<node>[^:\s]+): Communication connection failure|Node failure on (?P<node2>\S+)"
        r"|JOB \d+ ON (?P<node3>\S+) CANCELLED AT \S+ DUE TO NODE FAILURE",
        {"kind": "fault"},
    ),
    ("time_limit", r"DUE TO TIME LIMIT", {"kind": "fault"}),
    ("traceback", r"Traceback \(most recent call last\)", {"kind": "fault"}),
)


def node_from_groups(groups: dict[str, Any]) -> str | None:
    """The failing node named by a node_failure event."""
    for key in ("node", "node2", "node3"):
        value = groups.get(key)
        if value:
            return str(value).rstrip(".,;")
    return None
