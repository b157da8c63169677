"""Megatron-LM log lines: the built-in events every training job is watched for.

The dialects of Megatron-LM 2.x to core 0.19, Megatron-Bridge and Megatron-DeepSpeed, read from their
format strings (docs/megatron-versions.md; one recorded log each in tests/fixtures/megatron_logs/).
Every ` key: value |` field of the iteration line is optional and order-free, lines may carry a
timestamp or a `[default0]:` / `0: ` prefix.
"""

from __future__ import annotations

import math
import re
from typing import Any

ITERATION = re.compile(r"\biteration\s+(?P<iteration>\d+)/\s*(?P<train_iters>\d+)\s*\|")
# a number as Python prints one: `%d`, `%.1f`, `%.6E`; NaN and infinities as `%.6E` (`NAN`, `INF`) or `%f` do
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?i:[-+]?(?:nan|inf(?:inity)?))"
_FIELD = re.compile(r"\|\s*([A-Za-z][A-Za-z0-9 ()/_.\-]*?):\s*(" + NUMBER + r")\s*(?=\|)")
# iteration-line field name -> event field (Megatron-LM 2.x to core 0.19, Megatron-Bridge, Megatron-DeepSpeed);
# any other ` key: value |` pair is kept under its name in snake case (MoE losses, energy, ...)
ITERATION_FIELDS = {
    "consumed samples": "consumed_samples",
    "consumed tokens": "consumed_tokens",
    "skipped samples": "skipped_samples",
    "elapsed time per iteration (ms)": "elapsed_ms",
    "throughput per GPU (TFLOP/s/GPU)": "tflops_per_gpu",
    "TFLOPs": "tflops_per_gpu",
    "Tokens per second per GPU (Tok/s/GPU)": "tokens_per_second_per_gpu",
    "tokens per gpu per second (tgs)": "tokens_per_second_per_gpu",
    "samples per second": "samples_per_second",
    "learning rate": "lr",
    "decoupled learning rate": "decoupled_lr",
    "global batch size": "global_batch_size",
    "lm loss": "loss",
    "loss scale": "loss_scale",
    "grad norm": "grad_norm",
    "num zeros": "num_zeros",
    "params norm": "params_norm",
    "number of skipped iterations": "skipped_iterations",
    "number of nan iterations": "nan_iterations",
    "mem usages": "mem_usage",
}
COUNT_FIELDS = frozenset(
    {
        "consumed_samples",
        "consumed_tokens",
        "skipped_samples",
        "global_batch_size",
        "skipped_iterations",
        "nan_iterations",
    }
)


def number(text: str) -> int | float | str:
    """A logged number; NaN and infinities stay text (`nan`, `inf`, `-inf`): JSON has no such numbers."""
    value = float(text)
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("-inf" if value < 0 else "inf")
    return value


def field_name(label: str) -> str:
    """The event field of an iteration-line label: a known one's name, else the label in snake case."""
    label = label.strip()
    return ITERATION_FIELDS.get(label) or re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def iteration_fields(line: str) -> dict[str, Any]:
    """Numbers of a Megatron iteration line (`iteration 100/ 1000 | ... | lm loss: 3.14E+00 | ...`).

    Every ` key: value |` pair after the iteration counts, in any order; a loss Megatron left out
    (it omits a NaN loss) is simply absent, and `nan_iterations` tells why.
    """
    m = ITERATION.search(line)
    if not m:
        return {}
    fields: dict[str, Any] = {"iteration": int(m.group("iteration")), "train_iters": int(m.group("train_iters"))}
    for label, text in _FIELD.findall(line[m.end() - 1 :]):
        key = field_name(label)
        if not key or key in fields:
            continue
        value = number(text)
        fields[key] = int(value) if key in COUNT_FIELDS and isinstance(value, float) else value
    return fields


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# (name, regex, metadata): checked on every new line of a job's log
# Checkpoint lines over the versions (Megatron-LM 2.x .. core 0.19, Bridge, DeepSpeed): `at iteration` up to
# core 0.6 (printed before the tracker file is written), `from iteration` since 0.7, a `[ t a/b, p c/d ]` or
# `[ t a/b, gtp_remat x/y, p c/d ]` suffix since 0.10, a `[YYYY-MM-DD HH:MM:SS(.ffffff)]` stamp before the text
# since 0.16. The tracker file, not this line, says a checkpoint is complete (checkpoints.py).
# GPU faults the driver or CUDA reports (NVIDIA Xid codes, ECC, a GPU lost from the bus); srun's error line names
# the node of the task that died
GPU_HARDWARE_ERROR = (
    r"\bXid\b[^\n]*?\b(?:48|63|64|74|79|92|94|95|119|120)\b|uncorrectable ECC error|fallen off the bus|GPU is lost"
)
CHECKPOINT_SAVED = r"successfully saved checkpoint (?:from|at) iteration\s+(?P<iteration>\d+) to (?P<path>\S+)"
VALIDATION = (
    r"validation(?:-(?P<set>[\w.\-]+))? loss at (?:iteration\s+(?P<iteration>\d+)"
    r"(?:\s+on (?:[\w\-]+ draw from )?(?P<split>\w+) set)?"
    r"|the end of training for (?P<end_split>\w+) data)\s*\|.*?lm loss value:\s*(?P<loss>" + NUMBER + r")"
    r"(?:.*?lm loss PPL:\s*(?P<ppl>" + NUMBER + r"))?"
)
# the model's size, printed before training: per model-parallel rank (Megatron-LM 2.x to core 0.15: `(tensor,
# pipeline) ... rank (T, P): N`; core 0.19 adds a middle axis, `(tensor, gtp_weight_remat, pipeline)` or
# `(tensor, gtp_remat, pipeline)`), and with --log-memory-usage the total (`in billions: %.2f`)
PARAMETERS = (
    r"> number of parameters on \((?P<axes>[\w, ]+)\) model parallel rank \((?P<rank>[\d, ]+)\):\s*(?P<count>\d+)"
    r"|Total number of parameters in billions:\s*(?P<billions>" + NUMBER + r")"
)
# the rerun state machine (core 0.10+, on by default since 0.14): `Rank R, node H, device D[, iteration #N]: ...`
RERUN_NODE = r"Rank \d+, node (?P<node>[^,\s]+), device \d+|\(node: (?P<node2>[^,\s]+), gpu: \d+\)"

# (name, regex, metadata): checked on every new line of a job's log
BUILTIN_EVENTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("iteration", ITERATION.pattern, {"kind": "progress"}),
    ("validation", VALIDATION, {"kind": "eval"}),
    ("checkpoint_saved", CHECKPOINT_SAVED, {"kind": "checkpoint"}),
    (
        "checkpoint_scheduled",
        r"scheduled an async checkpoint save at iteration\s+(?P<iteration>\d+) to (?P<path>\S+)",
        {"kind": "checkpoint"},
    ),
    (
        "checkpoint_loaded",
        r"successfully loaded checkpoint from (?P<path>\S+).*?at iteration (?P<iteration>\d+)",
        {"kind": "resume"},
    ),
    ("fresh_start", r"will not load any checkpoints and will start from random", {"kind": "resume"}),
    ("parameters", PARAMETERS, {"kind": "model"}),
    ("training_done", r"\[after training is done\]", {"kind": "finish"}),
    ("exit_signal", r"\[exiting program after receiving (?P<signal>SIG\w+)\.\]", {"kind": "exit"}),
    ("exit_duration", r"\[exiting program after (?P<minutes>[\d.]+) minutes\]", {"kind": "exit"}),
    ("exit_iteration", r"\[exiting program at iteration (?P<iteration>\d+)\]", {"kind": "exit"}),
    (
        "rerun_resume",
        r"Saving a checkpoint and exiting now\. Please resume the job|Exiting now\. Please resume the job from the same"
        r" checkpoint|Got rescheduled on the same GPU",
        {"kind": "fault"},
    ),
    (
        "rerun_failed",
        r"Exiting now\. (?:A checkpoint at the last iteration|The job can be resumed from a previous checkpoint)"
        r"|Possible (?:persistent|transient) error",
        {"kind": "fault"},
    ),
    (
        "nan",
        r"found NaN in local|Unexpected result (?:tensor\()?(?:nan|inf)",
        {"kind": "fault"},
    ),
    ("cuda_oom", r"CUDA out of memory|OutOfMemoryError|Failed to CUDA calloc", {"kind": "fault"}),
    (
        "nccl_error",
        r"NCCL (?:ERROR|error)|ProcessGroupNCCL.*?(?:timeout|Watchdog caught)|DistBackendError|NCCL WARN NET/IB",
        {"kind": "fault"},
    ),
    ("gpu_error", GPU_HARDWARE_ERROR, {"kind": "fault"}),
    (
        "node_failure",
        r"failed on node (?P<node>[^:\s]+): Communication connection failure|Node failure on (?P<node2>\S+)"
        r"|JOB \d+ ON (?P<node3>\S+) CANCELLED AT \S+ DUE TO NODE FAILURE",
        {"kind": "fault"},
    ),
    ("time_limit", r"DUE TO TIME LIMIT", {"kind": "fault"}),
    ("traceback", r"Traceback \(most recent call last\)", {"kind": "fault"}),
)


def logged_parameters(by_rank: dict[str, int], billions: float | None) -> int | float | None:
    """The model's parameters as its log gave them: the sum over its tensor- and pipeline-parallel ranks
    (other model-parallel axes at rank 0: they hold the same weights), else Megatron's total in billions
    (2 decimals), else None. `by_rank`: `"(axes) (ranks)"` -> count, as the summary keeps them."""
    total = 0
    for key, count in by_rank.items():
        axes, _, ranks = key.partition(") (")
        named = dict(zip(axes.strip("()").split(", "), ranks.strip("()").split(", "), strict=False))
        if all(index == "0" for axis, index in named.items() if axis not in ("tensor", "pipeline")):
            total += count
    if total:
        return total
    return billions * 1e9 if isinstance(billions, int | float) and billions > 0 else None


def node_from_groups(groups: dict[str, Any]) -> str | None:
    """The failing node named by a node_failure, gpu_error or rerun line."""
    for key in ("node", "node2", "node3"):
        value = groups.get(key)
        if value:
            return str(value).rstrip(".,;")
    return None
