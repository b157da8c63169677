"""Watching jobs without Airflow: log events, inactivity, failure classification, resume policy."""
