"""Triggers (run in the triggerer) and the shared per-connection poller they all use."""

from airflow_oellm.triggers.checkpoint import CheckpointTrigger
from airflow_oellm.triggers.job import SlurmJobTrigger
from airflow_oellm.triggers.log_event import LogEventTrigger
from airflow_oellm.triggers.poller import JobPoller, PollUpdate

__all__ = ["CheckpointTrigger", "JobPoller", "LogEventTrigger", "PollUpdate", "SlurmJobTrigger"]
