"""Sensors that run beside a training task: checkpoints and log events."""

from airflow_oellm.sensors.checkpoint import CheckpointSensor
from airflow_oellm.sensors.log import SlurmLogSensor

__all__ = ["CheckpointSensor", "SlurmLogSensor"]
