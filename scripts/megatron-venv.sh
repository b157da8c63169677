#!/usr/bin/env bash
# A venv with real megatron-core (CPU torch) for writing the converter's gold fixtures:
#   scripts/megatron-venv.sh 0.19.2     -> .venv/megatron-0.19.2/bin/python
# Kept apart from .venv so the product is never tested with megatron importable. megatron-core
# goes in without its dependencies (its extras pull CUDA packages) and, for releases that declare
# Python >= 3.12 but run on 3.11, past the Python check.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/megatron-venv.sh MEGATRON_CORE_VERSION}
LOCK=constraints/airflow-3.3.2-py3.11.txt
VENV=.venv/megatron-$VERSION
[ -x .venv/bin/uv ] || scripts/install.sh
if ! "$VENV/bin/python" -c "import megatron.core" 2>/dev/null; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    .venv/bin/uv pip install -q --python "$VENV/bin/python" -c "$LOCK" --find-links "${OELLM_WHEELS:-/opt/wheels}" \
        torch numpy packaging psutil pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python \
        "megatron-core==$VERSION"
fi
echo "$VENV/bin/python"
