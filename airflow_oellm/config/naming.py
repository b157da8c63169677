"""Stable names and paths: pure functions of a sweep point.

The experiment name comes from `sweep.name_template` (`"{model}_lr{backend.args.lr}"`); every
path of an experiment derives from it and `project.base_output_dir`, never from a time or job id,
so retries, restarts and re-parses agree. Only SLURM log file names carry the job id (`%j`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_NAME_LENGTH = 120
DAG_ID_PREFIX = "oellm"
_FIELD = re.compile(r"\{([^{}:!]*)(?::([^{}]*))?\}")
# characters a path may hold on its way into a quoted script (no whitespace, quotes or shell syntax)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.\-+=,@%/]*$")


class NamingError(ValueError):
    pass


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def resolve_field(name: str, fields: Mapping[str, Any]) -> Any:
    """A template field: an exact key, else the one key whose last dotted part matches."""
    if name in fields:
        return fields[name]
    matches = [k for k in fields if k.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return fields[matches[0]]
    if len(matches) > 1:
        raise NamingError(f"field {{{name}}} is ambiguous: {', '.join(sorted(matches))}; write the full key")
    raise NamingError(f"unknown field {{{name}}}; available: {', '.join(sorted(fields)) or 'none'}")


def render_template(template: str, fields: Mapping[str, Any]) -> str:
    """`{key}` / `{key:format}` substitution; `{{` and `}}` are literal braces."""
    parts: list[str] = []
    pos = 0
    text = template.replace("{{", "\0").replace("}}", "\1")
    for m in _FIELD.finditer(text):
        parts.append(text[pos : m.start()])
        value = resolve_field(m.group(1).strip(), fields)
        spec = m.group(2)
        if spec:
            try:
                parts.append(format(value, spec))
            except (ValueError, TypeError) as exc:
                raise NamingError(f"cannot format {value!r} with '{spec}': {exc}") from None
        else:
            parts.append(format_value(value))
        pos = m.end()
    parts.append(text[pos:])
    rendered = "".join(parts)
    if "{" in rendered or "}" in rendered:
        raise NamingError(f"unbalanced braces in template {template!r}")
    return rendered.replace("\0", "{").replace("\1", "}")


def check_name(name: str, what: str = "experiment name") -> str:
    if not name:
        raise NamingError(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NamingError(f"{what} {name!r} is longer than {MAX_NAME_LENGTH} characters")
    if not NAME_PATTERN.match(name):
        bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9_.\-]", c)})
        shown = " ".join(repr(c) for c in bad) or "its first character"
        raise NamingError(
            f"{what} {name!r} is not safe for file names and DAG ids: {shown} not allowed "
            "(use letters, digits, '_', '.', '-'; start with a letter or digit; "
            "format numbers in the template, e.g. {lr:.0e} gives 1e-04)"
        )
    return name


def check_output_root(path: str, what: str = "project.base_output_dir") -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise NamingError(f"{what} must be an absolute path on the cluster, got {path!r}")
    normal = posixpath.normpath(path)
    if not _SAFE_PATH.match(normal) or "/../" in f"{normal}/":
        raise NamingError(
            f"{what} {path!r} has characters that are not safe in paths (allowed: letters, digits, / _ . - + = , @ %)"
        )
    return normal


# The layout of a job's output directory on the cluster. Only log file names carry the job id (%j).
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
SCRIPTS_DIR = "scripts"
PROVENANCE_DIR = "provenance"
REPORT_DIR = "report"
# a sweep's analysis: <base_output_dir>/_analysis/<sweep>/ (no experiment's name starts with '_')
ANALYSIS_DIR = "_analysis"


def analysis_dir(base_output_dir: str, sweep: str) -> str:
    return f"{base_output_dir}/{ANALYSIS_DIR}/{sweep}"


def log_file(name: str) -> str:
    return f"{name}-%j.out"


def script_file(name: str, try_number: int) -> str:
    return f"{name}-try{try_number}.sbatch"


def job_paths(name: str, out: str) -> dict[str, str]:
    """The `experiment` section's paths of a job named `name` writing to `out`."""
    return {"name": name, "output_dir": out, **_derived_paths(name, out, f"{out}/{LOGS_DIR}")}


def job_path_interpolations(name: str) -> dict[str, str]:
    """`job_paths` as the loader writes them before resolution: under `${project.base_output_dir}`,
    each derived from `${experiment.output_dir}` (so an override of one moves the others)."""
    output_dir = "${project.base_output_dir}/" + name
    return {"output_dir": output_dir, **_derived_paths(name, "${experiment.output_dir}", "${experiment.log_dir}")}


def _derived_paths(name: str, out: str, logs: str) -> dict[str, str]:
    """The layout under a job's output directory `out` (its log directory `logs`)."""
    return {
        "checkpoint_dir": f"{out}/{CHECKPOINTS_DIR}",
        "log_dir": f"{out}/{LOGS_DIR}",
        "log_path": f"{logs}/{log_file(name)}",
        "script_dir": f"{out}/{SCRIPTS_DIR}",
        "provenance_dir": f"{out}/{PROVENANCE_DIR}",
    }


# DAG ids: `oellm__<sweep>` runs a sweep, `oellm__<sweep>__<experiment>` is one experiment. An experiment
# name may itself hold `__`; a sweep name holding it (or ending in `_`) is ambiguous, and the first
# part is taken as the sweep.
SEPARATOR = "__"
CONFIG_ERRORS_DAG_ID = f"{DAG_ID_PREFIX}{SEPARATOR}config_errors"
# not `oellm__...`: that is a sweep's namespace
RECONCILE_DAG_ID = f"{DAG_ID_PREFIX}_reconcile"
MAINTENANCE_TAG = "maintenance"


def dag_id(sweep: str, name: str) -> str:
    return f"{DAG_ID_PREFIX}{SEPARATOR}{sweep}{SEPARATOR}{name}"


def sweep_dag_id(sweep: str) -> str:
    return f"{DAG_ID_PREFIX}{SEPARATOR}{sweep}"


@dataclass(frozen=True)
class DagIdParts:
    sweep: str
    experiment: str | None  # None: the sweep's own DAG


def parse_dag_id(the_dag_id: str) -> DagIdParts | None:
    """The inverse of `dag_id` and `sweep_dag_id`; None for a DAG that is not ours."""
    prefix, _, rest = the_dag_id.partition(SEPARATOR)
    if prefix != DAG_ID_PREFIX or not rest:
        return None
    sweep, separator, experiment = rest.partition(SEPARATOR)
    return DagIdParts(sweep, experiment if separator else None)


def experiment_name(the_dag_id: str, sweep: str) -> str:
    """The experiment an id of `sweep` names; any other id is shown as it is."""
    prefix = dag_id(sweep, "")
    return the_dag_id[len(prefix) :] if the_dag_id.startswith(prefix) else the_dag_id


# DAG tags: what the dashboard finds sweeps by.
OELLM_TAG = "oellm"
SWEEP_TAG_PREFIX = "sweep:"
SWEEP_DAG_TAG = "sweep"  # the DAG that runs a whole sweep, not an experiment


def sweep_tag(sweep: str) -> str:
    return f"{SWEEP_TAG_PREFIX}{sweep}"


def parse_sweep_tag(tag: str) -> str | None:
    return tag.removeprefix(SWEEP_TAG_PREFIX) if tag.startswith(SWEEP_TAG_PREFIX) else None


def platform_tag(platform: str) -> str:
    return f"platform:{platform}"


def model_tag(model: Any) -> str:
    return f"model:{model}"


# Task ids of an experiment DAG (dag_factory/builder.py). The report, the dashboard, the sensors and
# the status files on the cluster find tasks by them.
PREPARE_TASK = "prepare"
TRAIN_TASK = "train"
WAIT_TASK = "wait"
CONVERT_TASK = "convert"
EVALUATE_TASK = "evaluate"
COOLDOWN_PLAN_TASK = "cooldown_plan"
REPORT_TASK = "report"
OUTCOME_TASK = "outcome"
SYNC_TASK = "sync_wandb"  # pushes offline W&B runs (after the training, in each branch)
CHECKPOINT_GROUP = "checkpoint"  # mapped over the run's checkpoint milestones
COOLDOWN_GROUP = "cooldown"  # mapped over its cooldowns


def in_group(group: str, task: str) -> str:
    return f"{group}.{task}"


COOLDOWN_TRAIN_TASK = in_group(COOLDOWN_GROUP, TRAIN_TASK)
CHECKPOINT_CONVERT_TASK = in_group(CHECKPOINT_GROUP, CONVERT_TASK)
CHECKPOINT_EVALUATE_TASK = in_group(CHECKPOINT_GROUP, EVALUATE_TASK)
COOLDOWN_EVALUATE_TASK = in_group(COOLDOWN_GROUP, EVALUATE_TASK)
# Task ids of a sweep DAG: a mapped trigger task per part of the sweep, then the summary.
RUN_TASK = "run"
SUMMARY_TASK = "summary"
ANALYSIS_TASK = "analysis"
EARLY_STOP_TASK = "early_stop"


def run_part_task(part: int, parts: int) -> str:
    return RUN_TASK if parts == 1 else f"{RUN_TASK}_{part}"


# XCom keys and the task state store's key: the operators write them, the report and the dashboard
# read them. They are stored in deployed databases: never rename one.
RETURN_KEY = "return_value"  # Airflow's key of a task's return value
RESULT_KEY = "result"  # a job task's result when it fails (its return value when it succeeds)
PROGRESS_KEY = "progress"  # a running job's progress snapshot
JOB_ID_KEY, LOG_PATH_KEY, SCRIPT_PATH_KEY = "job_id", "log_path", "script_path"  # a job task's submission
CONFIG_KEY = "config"  # prepare: the run's resolved config
OVERRIDES_KEY, RUN_TIME_KEY = "overrides", "run_time"  # prepare: the run's conf overrides, its frozen clock
CHECKPOINTS_KEY, COOLDOWNS_KEY = "checkpoints", "cooldowns"  # prepare: the run's milestones
TRACKING_KEY = "tracking"  # prepare: the W&B run and TensorBoard directory of the training and each cooldown
CONFIG_DIFF_KEY = "config_diff"  # prepare: how the run's config differs from its sweep's base (config/diff.py)
HISTORY_KEY = "oellm_attempts"  # task state store: a job task's attempts, across its tries
SCRIPT_KEY_PREFIX = "oellm_sbatch_"  # task state store: + try number, the job script that try submitted


def script_key(try_number: int) -> str:
    """The task state store's key of the job script a try submitted."""
    return f"{SCRIPT_KEY_PREFIX}{try_number}"


DASHBOARD_PATH = "/oellm"  # where the api-server mounts the dashboard (links to it, from alerts too)
