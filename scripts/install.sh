#!/usr/bin/env bash
# Create or update .venv from the committed lock (constraints/), with compiled bytecode.
#   scripts/install.sh            the package (editable) with its test tools
# uv is pinned; --compile-bytecode matters because PYTHONDONTWRITEBYTECODE=1 may be set, and
# without .pyc files every Airflow process starts 2-3 s slower.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=constraints/airflow-3.3.2-py3.11.txt
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode -c "$LOCK" -e ".[test]"
