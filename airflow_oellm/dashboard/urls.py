"""Where the dashboard is mounted in the api-server, and the links to it from Airflow's pages.

Airflow-free, so that the plugin (which mounts the app) and the app (which builds links under the
prefix) both read it without importing each other.
"""

from __future__ import annotations

from airflow_oellm.config.naming import DASHBOARD_PATH

URL_PREFIX = DASHBOARD_PATH
# Airflow resolves an external view's href against its UI root, so the links are relative.
SWEEPS_HREF = f"{URL_PREFIX.lstrip('/')}/"
TRAINING_HREF = f"{URL_PREFIX.lstrip('/')}/experiments/{{DAG_ID}}"
