"""Operator extra links: the Airflow UI's buttons from a task to where its training is tracked."""
