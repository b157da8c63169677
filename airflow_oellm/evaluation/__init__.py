"""Offline evaluation of converted checkpoints (no Airflow imports): built-in perplexity and
bits per byte, lm-evaluation-harness tasks when the optional extra is installed."""
