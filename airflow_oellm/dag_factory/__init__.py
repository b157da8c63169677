"""Sweep YAML files -> Airflow DAGs (see builder.py), and the loader the thin DAG file calls."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from airflow_oellm.config import ConfigError, Sweep, load_sweep
from airflow_oellm.config.errors import shown
from airflow_oellm.config.naming import CONFIG_ERRORS_DAG_ID, RECONCILE_DAG_ID, parse_dag_id, sweep_dag_id
from airflow_oellm.dag_factory.builder import cluster_dag_ids, experiment_dag, reconcile_dag, sweep_dag

SWEEPS_PATH_ENV = "OELLM_SWEEPS_PATH"
log = logging.getLogger(__name__)


class SweepConfigErrors(DAG):
    """Carries the errors of broken sweep files into Airflow's import errors (raised when bagged),
    while every other sweep's DAGs load."""

    def __init__(self, messages: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages = messages

    def validate(self) -> None:
        raise ConfigError("\n".join(self.messages))


def sweep_files(directories: Iterable[str | os.PathLike[str]]) -> list[Path]:
    found: list[Path] = []
    for directory in directories:
        path = Path(directory)
        candidates = [path] if path.is_file() else sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
        found += [p for p in candidates if p not in found]
    return found


def configured_directories(defaults: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """The given directories, then `$OELLM_SWEEPS_PATH`, then Airflow's `[oellm] sweeps_path` (`:`-separated)."""
    dirs = [str(d) for d in defaults]
    dirs += [d for d in os.environ.get(SWEEPS_PATH_ENV, "").split(":") if d]
    try:
        from airflow.configuration import conf

        dirs += [d for d in conf.get("oellm", "sweeps_path", fallback="").split(":") if d]
    except Exception:  # outside an Airflow deployment (tests, scripts): no config option
        pass
    return list(dict.fromkeys(dirs))


def load_dags(directories: Iterable[str | os.PathLike[str]] = (), config_dirs: Iterable[str] = ()) -> dict[str, DAG]:
    """Every sweep's DAGs, keyed by DAG id. A broken sweep becomes an import error, never a missing file.

    When a worker parses to run one task (`get_parsing_context().dag_id`), only that DAG is built,
    from the sweep file named like the DAG's sweep when there is one (else from every file).
    """
    from airflow.sdk import get_parsing_context

    wanted = get_parsing_context().dag_id
    paths = sweep_files(configured_directories(directories))
    # Building thousands of operators allocates millions of long-lived objects: the cyclic
    # collector would rescan them again and again for no garbage (a fifth of the time, measured).
    collecting = gc.isenabled()
    gc.disable()
    try:
        parts = parse_dag_id(wanted) if wanted else None
        if parts:
            dags = _build([p for p in paths if p.stem == parts.sweep], list(config_dirs), wanted)
            if wanted in dags:
                return dags
        return _build(paths, list(config_dirs), wanted)
    finally:
        if collecting:
            gc.enable()


def _build(paths: list[Path], config_dirs: list[str], wanted: str | None) -> dict[str, DAG]:
    dags: dict[str, DAG] = {}
    sweeps: list[Sweep] = []
    errors: list[str] = []
    parts = parse_dag_id(wanted) if wanted else None
    only = parts.experiment if parts else None  # a worker runs a task of one experiment's DAG
    for path in paths:
        # each file alone: whatever goes wrong in one becomes its import error, never another's
        try:
            sweep = load_sweep(path, config_dirs=config_dirs, only=only)
            dags.update(_sweep_dags(sweep, config_dirs, wanted))
            sweeps.append(sweep)
        except ConfigError as exc:
            log.error("sweep %s is invalid:\n%s", path, exc)
            errors.append(str(exc))
        except Exception as exc:
            log.exception("sweep %s could not be loaded", path)
            errors.append(
                f"{path}: could not be loaded: {type(exc).__name__}: {shown(str(exc), 300)} (this is a bug in "
                "airflow-oellm, please report it; the traceback is in the dag-processor's log; the other sweeps loaded)"
            )
    if sweeps and only is None and wanted in (None, RECONCILE_DAG_ID):
        try:
            dags[RECONCILE_DAG_ID] = reconcile_dag(cluster_dag_ids(sweeps))
        except ValueError as exc:  # a bad Airflow setting: its own import error, every sweep's DAGs still load
            log.error("%s is not built: %s", RECONCILE_DAG_ID, exc)
            errors.append(f"{RECONCILE_DAG_ID} is not built: {exc}")
    if errors:
        dags[CONFIG_ERRORS_DAG_ID] = SweepConfigErrors(errors, dag_id=CONFIG_ERRORS_DAG_ID, schedule=None)
    return dags


def _sweep_dags(sweep: Sweep, config_dirs: list[str], wanted: str | None) -> dict[str, DAG]:
    dags: dict[str, DAG] = {}
    for exp in sweep.experiments:
        if not wanted or wanted == exp.dag_id:
            dags[exp.dag_id] = experiment_dag(sweep, exp, config_dirs)
    if not wanted or wanted == sweep_dag_id(sweep.name):
        dags[sweep_dag_id(sweep.name)] = sweep_dag(sweep)
    return dags


__all__ = ["experiment_dag", "load_dags", "reconcile_dag", "sweep_dag"]
