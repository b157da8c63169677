"""The sweep dashboard plugin: a FastAPI app mounted in the api-server at `/oellm`, linked from the
Airflow navigation ("Sweeps") and from every DAG's page ("Training")."""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_oellm.dashboard.urls import SWEEPS_HREF, TRAINING_HREF, URL_PREFIX


class _DashboardApp:
    """The ASGI app, built at its first request: every Airflow process loads plugins, only the
    api-server serves them, and the others need not import FastAPI's stack for it."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            from airflow_oellm.dashboard.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class OellmDashboardPlugin(AirflowPlugin):
    name = "oellm_dashboard"
    fastapi_apps = [{"app": _DashboardApp(), "url_prefix": URL_PREFIX, "name": "airflow-oellm dashboard"}]
    external_views = [
        {"name": "Sweeps", "href": SWEEPS_HREF, "destination": "nav", "url_route": "oellm-sweeps"},
        {
            "name": "Training",
            "href": TRAINING_HREF,
            "destination": "dag",
            "url_route": "oellm-training",
        },
    ]
