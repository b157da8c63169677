#!/usr/bin/env bash
# make demo: install from the lock, bring up the dev SLURM cluster (root + apt) or fall back to local
# processes, then run the example sweep through a real Airflow (scripts/demo.py).
#   OELLM_DEMO_BATCH_SYSTEM=local-process   use local processes even where the cluster could run
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export OELLM_DEMO_STARTED=${OELLM_DEMO_STARTED:-$(date +%s)}
batch_system=${OELLM_DEMO_BATCH_SYSTEM:-}
if [ -z "$batch_system" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        batch_system=slurm
    else
        batch_system=local-process
        echo "== no root or apt-get: the demo runs its jobs as local processes (batch system local-process), not on SLURM"
    fi
fi
echo "== installing from the lock into .venv"
scripts/install.sh
if [ "$batch_system" = slurm ]; then
    echo "== bringing up the dev SLURM cluster (slurmctld, slurmd, slurmdbd, MariaDB, munge, sshd on 127.0.0.1)"
    scripts/dev-cluster.sh up
    echo "== installing the provider's commands and the tiny trainer for the cluster's job user"
    scripts/dev-cluster.sh tools > /dev/null
fi
exec .venv/bin/python scripts/demo.py --batch-system "$batch_system" "$@"
