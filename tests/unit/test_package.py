"""Packaging facts: provider registration, layering, the lock, the generated docs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_oellm.config.reference import schema_markdown
from airflow_oellm.get_provider_info import get_provider_info
from tests.conftest import REPO

LOWER_LAYERS = ("config", "slurm", "monitor", "megatron")


def airflow_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__CORE__LOAD_EXAMPLES="False", PYTHONWARNINGS="ignore")
    return env


@pytest.mark.provider
def test_airflow_lists_the_provider(tmp_path):
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run(
        [str(airflow), "providers", "list", "-o", "json"],
        env=airflow_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    start = out.index("[")  # Airflow may log a line before the JSON
    providers = {p["package_name"]: p for p in json.loads(out[start:])}
    assert providers["airflow-oellm"]["version"] == get_provider_info()["versions"][0]


@pytest.mark.provider
def test_provider_info_matches_airflow_schema():
    import jsonschema
    from airflow.providers_manager import _create_provider_info_schema_validator

    validator = _create_provider_info_schema_validator()
    validator.validate(get_provider_info())
    with pytest.raises(jsonschema.ValidationError):  # the validator does reject a broken info
        validator.validate({"package-name": "x"})


def test_lower_layers_import_nothing_from_airflow():
    offenders = []
    for layer in LOWER_LAYERS:
        for path in (REPO / "airflow_oellm" / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                bad = [n for n in names if n == "airflow" or n.startswith("airflow.")]
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in bad]
    assert offenders == []
    code = (
        "import sys, airflow_oellm.cli, airflow_oellm.config, airflow_oellm.jobscript.render; "
        "bad = [m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lock_pins_every_dependency():
    lock = (REPO / "constraints" / "airflow-3.3.2-py3.11.txt").read_text()
    pins = dict(line.split("==", 1) for line in lock.splitlines() if "==" in line)
    for name in ("apache-airflow", "apache-airflow-providers-ssh", "omegaconf", "jinja2", "pendulum", "pytest", "ruff"):
        assert name in pins, name
    assert pins["apache-airflow"].startswith("3.3.")
    # never a CUDA torch: the converter's torch is the CPU build, and no CUDA runtime comes along
    assert pins["torch"].endswith("+cpu")
    assert not any(name.startswith(("nvidia-", "triton")) for name in pins)
    for name in ("transformers", "safetensors"):  # the converter's and evaluator's extras
        assert name in pins, name


def test_configuration_reference_is_generated_from_the_schema():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == schema_markdown(), "docs/configuration.md is stale: airflow-oellm schema > docs/configuration.md"


def test_readme_names_the_two_commands_and_make_has_them():
    """The commands themselves run in tests/demo (README's airflow-oellm lines, the demo) and in CI (make test)."""
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    targets = {line.split(":", 1)[0] for line in (REPO / "Makefile").read_text().splitlines() if ":" in line}
    assert {"demo", "demo-stop", "test", "plan"} <= targets
