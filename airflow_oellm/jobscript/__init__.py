"""Job scripts: an experiment's config rendered into a safe sbatch script (Jinja2 templates)."""
