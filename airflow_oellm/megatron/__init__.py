"""Megatron-LM knowledge without Airflow: log lines, checkpoint layout and readiness, reading
checkpoints (torch_dist and legacy, without megatron) and converting them to HuggingFace."""
