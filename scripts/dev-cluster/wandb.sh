#!/usr/bin/env bash
# Install W&B's client (and openwandb, the W&B-compatible server the tests use in place of W&B's cloud) from
# their lock into a venv the dev cluster's job user can execute: jobs log offline with it and the sync runs
# its `wandb sync` on the login node, as on a real site. Prints that venv's bin directory. Quick when done.
#   SLURM_DEV_WANDB_DIR   where the venv goes (default /opt/oellm-dev-wandb)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${SLURM_DEV_WANDB_DIR:-/opt/oellm-dev-wandb}
lock="$repo/constraints/wandb-tools-py3.11.txt"
uv="$repo/.venv/bin/uv"
[ -x "$uv" ] || "$repo/scripts/install.sh"
stamp="$venv/.lock.sha256"
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # the distribution's interpreter: a pyenv/user one may live where the job user cannot enter
    python=/usr/bin/python3.11
    [ -x "$python" ] || python=/usr/bin/python3
    rm -rf "$venv"
    "$uv" venv -q --python "$python" "$venv"
    "$uv" pip install -q --python "$venv/bin/python" --compile-bytecode -r "$lock"
    echo "$want" > "$stamp"
    chmod -R a+rX "$venv"
fi
echo "$venv/bin"
