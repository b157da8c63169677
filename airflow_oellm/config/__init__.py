"""Configuration model: schema, composition, overrides, resolvers, sweeps, naming, platforms.

No Airflow imports here: this layer is plain Python, used at DAG-parse time and by the CLI.
"""

from airflow_oellm.config.errors import ConfigError, Issue
from airflow_oellm.config.loader import Experiment, Sweep, load_sweep
from airflow_oellm.config.resolvers import frozen_time, register_resolvers
from airflow_oellm.config.schema import RootConfig

register_resolvers()

__all__ = ["ConfigError", "Experiment", "Issue", "RootConfig", "Sweep", "frozen_time", "load_sweep"]
