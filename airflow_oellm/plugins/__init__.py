"""Airflow plugins registered by the provider (`plugins` in its provider info)."""
