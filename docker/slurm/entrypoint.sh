#!/usr/bin/env bash
# Start the dev cluster with sshd reachable from the compose network, then hand Airflow what it needs
# to connect: the client key and the host key it pins (a volume shared with the Airflow services).
set -euo pipefail
SLURM_DEV_SSH_LISTEN=0.0.0.0 SLURM_DEV_SMOKE_TEST=0 /opt/airflow-oellm/scripts/dev-cluster.sh up
share=${OELLM_SSH_SHARE:-/oellm-ssh}
airflow_uid=${AIRFLOW_UID:-50000}
install -d -m 0755 "$share"
install -m 0600 -o "$airflow_uid" /var/lib/slurm-dev/id_ed25519 "$share/id_ed25519"
install -m 0644 /etc/ssh/ssh_host_ed25519_key.pub "$share/host_ed25519.pub"
touch "$share/ready"
exec tail -F /var/log/slurm/slurmctld.log
