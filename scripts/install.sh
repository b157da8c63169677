#!/usr/bin/env bash
# Create or update .venv from the committed lock (constraints/), with compiled bytecode.
#   scripts/install.sh            the package (editable) with its test tools, converter, evaluator and the
#                                 production stack's Celery executor and PostgreSQL driver
# uv is pinned; --compile-bytecode matters because PYTHONDONTWRITEBYTECODE=1 may be set, and
# without .pyc files every Airflow process starts 2-3 s slower.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=constraints/airflow-3.3.2-py3.11.txt
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
# torch is locked to its CPU build, which comes from the local wheel directory (never a CUDA torch)
WHEELS=${OELLM_WHEELS:-/opt/wheels}
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode -c "$LOCK" --find-links "$WHEELS" \
    -e ".[test,convert,evaluate,production]"
# the editable package's own modules are imported from the source tree: compile them too
# (every DAG-file parse and task process imports them)
"$VENV/bin/python" -m compileall -q airflow_oellm dags
# the DAG-parse benchmark's baseline, dag-factory, outside the venv: it registers an Airflow plugin
# that every Airflow process would load; benchmarks/dag_parse.py puts this directory on its path
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode -c "$LOCK" --no-deps --target "$VENV/bench-deps" dag-factory
