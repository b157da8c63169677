"""Provider metadata read by Airflow's ProvidersManager (entry point `apache_airflow_provider`)."""

from __future__ import annotations

from typing import Any

import airflow_oellm


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-oellm",
        "name": "OpenEuroLLM experiments on SLURM",
        "description": "Run Megatron-LM training sweeps on SLURM clusters (LUMI, Leonardo, JUWELS, JUPITER, "
        "MareNostrum 5, any SLURM site) over SSH: one DAG per experiment, resume, cooldowns, conversion "
        "and evaluation.",
        "versions": [airflow_oellm.__version__],
        "hooks": [{"integration-name": "SLURM", "python-modules": ["airflow_oellm.hooks.slurm"]}],
        "operators": [
            {
                "integration-name": "SLURM",
                "python-modules": [
                    "airflow_oellm.operators.submit",
                    "airflow_oellm.operators.prepare",
                    "airflow_oellm.operators.report",
                    "airflow_oellm.operators.tracking",
                ],
            }
        ],
        "extra-links": [
            "airflow_oellm.links.tracking.WandbRunLink",
            "airflow_oellm.links.tracking.TensorBoardLink",
        ],
        "sensors": [
            {
                "integration-name": "SLURM",
                "python-modules": ["airflow_oellm.sensors.checkpoint", "airflow_oellm.sensors.log"],
            }
        ],
        "triggers": [
            {
                "integration-name": "SLURM",
                "python-modules": [
                    "airflow_oellm.triggers.job",
                    "airflow_oellm.triggers.checkpoint",
                    "airflow_oellm.triggers.log_event",
                ],
            }
        ],
        "integrations": [
            {
                "integration-name": "SLURM",
                "external-doc-url": "https://slurm.schedmd.com/",
                "tags": ["software"],
            }
        ],
        "config": {
            "oellm": {
                "description": "airflow-oellm: where the sweeps are, and how deferred tasks are resumed.",
                "options": {
                    "sweeps_path": {
                        "description": "Directories of sweep files for the DAG file, `:`-separated, searched "
                        "after $OELLM_SWEEPS_PATH (docs/dags.md).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/sweeps:/shared/lab/sweeps",
                        "default": "",
                    },
                    "defer_settle_seconds": {
                        "description": "A trigger of this provider holds its event until this many seconds "
                        "after the task deferred. Airflow 3.3 fails a resumed task whose deferring worker's "
                        "exit the executor reads after the resume was queued; the hold keeps events out of "
                        "that window. Lower it only with a measurement of your deployment "
                        "(docs/reliability.md, 'The settle hold').",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "15",
                        "default": "15",
                    },
                    "reconcile_interval_minutes": {
                        "description": "How often the DAG `oellm_reconcile` cancels orphaned jobs: jobs whose "
                        "task was marked failed or success (or whose DAG run was marked failed) while no "
                        "triggerer followed them. 0: it runs only when triggered (docs/reliability.md, "
                        "'Orphaned jobs').",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "15",
                        "default": "15",
                    },
                },
            }
        },
    }
