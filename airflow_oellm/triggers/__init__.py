"""Triggers and the shared per-connection job poller (run in the triggerer)."""

from airflow_oellm.triggers.poller import JobPoller, PollUpdate

__all__ = ["JobPoller", "PollUpdate"]
