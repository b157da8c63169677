#!/usr/bin/env bash
# The project's dev cluster: a real single-node SLURM (slurmctld, slurmd, slurmdbd + MariaDB,
# munge) and an OpenSSH server on 127.0.0.1:2222 with key auth and strict host keys, from
# Debian packages. Idempotent. Needs root (and apt for the first `up`).
#
#   scripts/dev-cluster.sh up             install what is missing, start what is stopped, smoke-test
#   scripts/dev-cluster.sh down [--purge] stop what `up` started (--purge: also job state and logs)
#   scripts/dev-cluster.sh status         exit 0 if ssh + sbatch work, else 1
#   scripts/dev-cluster.sh env            print the connection settings (source with `set -a`)
#   scripts/dev-cluster.sh tools          install airflow-oellm convert/evaluate for cluster jobs
#   scripts/dev-cluster.sh wandb          install wandb (and openwandb, the tests' W&B server) for cluster jobs
#
# Tunables: see the header of scripts/dev-cluster/up.sh (SLURM_DEV_* variables).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state_dir=${SLURM_DEV_STATE_DIR:-/var/lib/slurm-dev}
case "${1:-}" in
  up) shift; exec bash "$here/dev-cluster/up.sh" "$@" ;;
  down) shift; exec bash "$here/dev-cluster/down.sh" "$@" ;;
  env) cat "$state_dir/cluster.env" ;;
  tools) shift; exec bash "$here/dev-cluster/tools.sh" "$@" ;;
  wandb) shift; exec bash "$here/dev-cluster/wandb.sh" "$@" ;;
  status)
    [ -r "$state_dir/cluster.env" ] || { echo "dev cluster: not set up" >&2; exit 1; }
    if ssh -n -o ConnectTimeout=5 -F "$state_dir/ssh_config" slurm-dev 'sinfo -h -o %t' >/dev/null 2>&1; then
      echo "dev cluster: up"
    else
      echo "dev cluster: down" >&2; exit 1
    fi ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
