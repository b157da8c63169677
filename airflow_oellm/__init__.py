"""airflow-oellm: run Megatron-LM training experiments on SLURM clusters from Apache Airflow."""

__version__ = "0.1.0"
