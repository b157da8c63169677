"""Analyses of a sweep's results, without Airflow."""
