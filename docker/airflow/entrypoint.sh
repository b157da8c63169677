#!/usr/bin/env bash
# The official image's entrypoint, with the SSH connection to the SLURM service defined first
# (AIRFLOW_CONN_SLURM_DEV, its host key pinned from the volume the SLURM service writes).
set -euo pipefail
share=${OELLM_SSH_SHARE:-/oellm-ssh}
if [ -f "$share/ready" ]; then
    AIRFLOW_CONN_SLURM_DEV=$(python /opt/airflow-oellm/docker/airflow/slurm_connection.py "$share")
    export AIRFLOW_CONN_SLURM_DEV
fi
exec /entrypoint "$@"
