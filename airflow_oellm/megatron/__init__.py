"""Megatron-LM knowledge without Airflow: log lines, checkpoint layout and readiness."""
