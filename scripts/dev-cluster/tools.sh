#!/usr/bin/env bash
# Install the provider's cluster-side commands (`airflow-oellm convert` / `evaluate`, with CPU torch
# and transformers) into a venv that the dev cluster's job user can execute, as a user would on a
# real cluster, with the tiny trainer beside it (<dir>/tiny_megatron). Prints that venv's bin directory.
# Re-run after code changes: the package is rebuilt.
#   SLURM_DEV_TOOLS_DIR   where the venv goes (default /opt/oellm-dev-tools)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tools=${SLURM_DEV_TOOLS_DIR:-/opt/oellm-dev-tools}
uv="$repo/.venv/bin/uv"
[ -x "$uv" ] || "$repo/scripts/install.sh"
# the distribution's interpreter: a pyenv/user one may live where the job user cannot enter
python=/usr/bin/python3.11
[ -x "$python" ] || python=/usr/bin/python3
if [ "$(readlink -f "$tools/bin/python" 2>/dev/null)" != "$(readlink -f "$python")" ]; then
    rm -rf "$tools"
    "$uv" venv -q --python "$python" "$tools"
fi
"$uv" pip install -q --python "$tools/bin/python" --compile-bytecode \
    -c "$repo/constraints/airflow-3.3.2-py3.11.txt" --find-links "${OELLM_WHEELS:-/opt/wheels}" \
    --reinstall-package airflow-oellm "$repo[convert,evaluate]"
# the tiny trainer (examples/tiny_megatron), where jobs can read it whatever the clone's permissions
rm -rf "$tools/tiny_megatron"
cp -r "$repo/examples/tiny_megatron" "$tools/tiny_megatron"
rm -rf "$tools/tiny_megatron/__pycache__"
chmod -R a+rX "$tools"
echo "$tools/bin"
