"""SLURM knowledge without Airflow: time specs, shell quoting, sbatch directives and script rendering."""
