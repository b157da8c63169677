"""Operators: SlurmSubmitOperator submits and follows training jobs."""

from airflow_oellm.operators.submit import SlurmSubmitOperator

__all__ = ["SlurmSubmitOperator"]
