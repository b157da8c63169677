"""Hooks: every remote command of the provider goes through SlurmHook or its async twin."""

from airflow_oellm.hooks.slurm import AsyncSlurmHook, SlurmHook

__all__ = ["AsyncSlurmHook", "SlurmHook"]
