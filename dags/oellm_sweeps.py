"""Airflow DAG file: one DAG per experiment of every sweep in config/sweeps/ (and $OELLM_SWEEPS_PATH)."""

from pathlib import Path

from airflow_oellm.dag_factory import load_dags

globals().update(load_dags([Path(__file__).resolve().parents[1] / "config" / "sweeps"]))
