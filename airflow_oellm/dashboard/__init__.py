"""The sweep dashboard: an Airflow UI plugin showing training progress, loss curves and evaluations."""
