"""Operators: SlurmSubmitOperator submits and follows SLURM jobs; the experiment DAG's own steps
(prepare, cooldown plan, report, run outcome, sweep summary) build on it; CancelOrphanedJobsOperator stops
jobs no task follows any more."""

from airflow_oellm.operators.prepare import CooldownPlanOperator, PrepareExperimentOperator
from airflow_oellm.operators.reconcile import CancelOrphanedJobsOperator
from airflow_oellm.operators.report import (
    ExperimentReportOperator,
    RunOutcomeOperator,
    SweepSummaryOperator,
)
from airflow_oellm.operators.submit import SlurmSubmitOperator

__all__ = [
    "CancelOrphanedJobsOperator",
    "CooldownPlanOperator",
    "ExperimentReportOperator",
    "PrepareExperimentOperator",
    "RunOutcomeOperator",
    "SlurmSubmitOperator",
    "SweepSummaryOperator",
]
