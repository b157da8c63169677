"""The dashboard's FastAPI app, mounted in the Airflow api-server at `/oellm` by the provider's plugin.

Pages (HTML, drawn on the server) and their JSON twins; every request is authenticated by Airflow's
own auth manager (the UI's `_token` cookie or a bearer token) and shows only DAGs the user may read.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlparse

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.configuration import conf
from airflow.utils.session import create_session
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from airflow_oellm.config.naming import experiment_name
from airflow_oellm.dashboard import queries
from airflow_oellm.dashboard.model import ExperimentView, SweepView, experiment_view, sweep_view
from airflow_oellm.dashboard.plot import DISCARDED, PALETTE, Series, line_plot
from airflow_oellm.dashboard.urls import URL_PREFIX

REFRESH_SECONDS = 20  # pages of something still running reload themselves this often
ACTIVE = frozenset({"running", "queued", "retrying"})


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _time(epoch: float | None) -> str:
    return "" if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _start(epoch: float | None, now: float | None = None) -> str:
    """An expected start: `Tue 14:20 UTC` within the week ahead, else with its date."""
    if epoch is None:
        return ""
    when = datetime.fromtimestamp(epoch, UTC)
    near = abs(epoch - (datetime.now(UTC).timestamp() if now is None else now)) < 6 * 86400
    return when.strftime("%a %H:%M UTC" if near else "%a %Y-%m-%d %H:%M UTC")


templates = Environment(loader=PackageLoader("airflow_oellm.dashboard", "templates"), autoescape=select_autoescape())
templates.filters.update(
    duration=_duration,
    number=_number,
    time=_time,
    start=_start,
    quote=lambda s: quote(str(s), safe=""),
    value=lambda v: json.dumps(v, default=str),
)


def ui_root() -> str:
    """The Airflow UI's path (links from the dashboard go there), from `[api] base_url`."""
    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def _colors(curves: list[Any]) -> dict[str, str]:
    groups = list(dict.fromkeys(c.group for c in curves))
    return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}


def plots(experiments: list[ExperimentView]) -> dict[str, Any]:
    """Loss vs iteration and vs tokens for every run; a cooldown dashed in its experiment's colour."""
    curves = [c for e in experiments for c in e.curves]
    colors = _colors(curves)
    by_iteration = [
        Series(c.run, c.points, colors[c.group], c.parent is not None, c.discarded, c.marks) for c in curves
    ]
    by_tokens = [
        Series(
            c.run,
            [(x * c.tokens_per_iteration, y) for x, y in c.points],
            colors[c.group],
            c.parent is not None,
            c.discarded,
            [(x * c.tokens_per_iteration, y, what) for x, y, what in c.marks],
        )
        for c in curves
        if c.tokens_per_iteration
    ]
    return {
        "iteration": line_plot("loss-vs-iteration", by_iteration, "iteration", "train loss"),
        "tokens": line_plot("loss-vs-tokens", by_tokens, "tokens", "train loss") if by_tokens else "",
        "legend": [(s.label, DISCARDED if s.discarded else s.color, s.dashed, bool(s.points)) for s in by_iteration],
    }


def analysis_plots(analysis: Mapping[str, Any] | None) -> dict[str, str]:
    """The analysis's loss against compute (with the frontier) and each size's loss against the learning rate,
    on log10 axes (the SVG plotter's are linear)."""
    measurements = (analysis or {}).get("measurements") or []
    sizes = sorted({m["parameters"] for m in measurements})
    best = ((analysis or {}).get("best") or {}).get("lr") or {}
    by_compute, by_rate = [], []
    for index, size in enumerate(sizes):
        color, label = PALETTE[index % len(PALETTE)], f"N = {size:.3g}"
        mine = [m for m in measurements if m["parameters"] == size]
        points = sorted((math.log10(m["flops"]), m["loss"]) for m in mine if _positive(m.get("flops")))
        by_compute.append(Series(label, points, color))
        tokens = (best.get(f"{size:.4g}") or {}).get("tokens")
        rates = sorted(
            (math.log10(m["lr"]), m["loss"]) for m in mine if m["tokens"] == tokens and _positive(m.get("lr"))
        )
        by_rate.append(Series(label, rates, color))
    frontier = ((analysis or {}).get("frontier") or {}).get("points") or []
    by_compute.append(
        Series("frontier", [(math.log10(c), loss) for c, loss in frontier if _positive(c)], "#000000", True)
    )
    return {
        "compute": line_plot("loss-vs-compute", by_compute, "log10 training FLOPs", "loss"),
        "rate": line_plot("lr-sensitivity", by_rate, "log10 learning rate", "loss"),
        "legend": [(s.label, s.color, s.dashed, bool(s.points)) for s in by_compute],
    }


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def allowed_dags(user: BaseUser) -> set[str]:
    return get_auth_manager().get_authorized_dag_ids(user=user, method="GET")


def _page(name: str, **values: Any) -> HTMLResponse:
    values.setdefault("root", ui_root())
    values.setdefault("prefix", ui_root() + URL_PREFIX)
    return HTMLResponse(templates.get_template(name).render(**values))


def _sweeps_overview(user: BaseUser) -> list[dict[str, Any]]:
    with create_session() as session:
        found = queries.sweeps(session, allowed_dags(user))
        states = queries.run_states(session, [d for ids in found.values() for d in ids])
    overview = []
    for name, dag_ids in found.items():
        counts: dict[str, int] = {}
        for dag_id in dag_ids:
            state = states.get(dag_id) or "never run"
            counts[state] = counts.get(state, 0) + 1
        overview.append({"name": name, "experiments": len(dag_ids), "counts": dict(sorted(counts.items()))})
    return overview


def _sweep(user: BaseUser, sweep: str) -> SweepView:
    with create_session() as session:
        dag_ids = queries.sweeps(session, allowed_dags(user)).get(sweep)
        if not dag_ids:
            raise HTTPException(404, f"no sweep named {sweep!r} (or none of its DAGs is readable for you)")
        latest = queries.latest_runs(session, dag_ids)
        records = queries.run_records(session, [pk for pk, _, _ in latest.values()])
    runs = {dag_id: records.get(latest[dag_id][0]) if dag_id in latest else None for dag_id in dag_ids}
    return sweep_view(sweep, runs, time.time())


def _experiment(user: BaseUser, dag_id: str, run_id: str | None) -> tuple[ExperimentView, str | None, list[Any]]:
    if dag_id not in allowed_dags(user):
        raise HTTPException(404, f"no DAG {dag_id!r} readable for you")
    with create_session() as session:
        sweep = queries.dag_sweep(session, dag_id)
        runs = queries.dag_runs(session, dag_id)
        chosen = next((r for r in runs if r[1] == run_id), None) if run_id else (runs[0] if runs else None)
        if run_id and chosen is None:
            raise HTTPException(404, f"{dag_id} has no recent run {run_id!r}")
        record = queries.run_records(session, [chosen[0]]).get(chosen[0]) if chosen else None
        if record is not None:
            queries.add_details(session, chosen[0], record)
    view = experiment_view(dag_id, experiment_name(dag_id, sweep or ""), record, time.time())
    return view, sweep, runs


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-oellm dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def explain(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)))
        if "application/json" in request.headers.get("accept", "") or "/api/" in request.url.path:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return _page("error.html", status=exc.status_code, detail=exc.detail, refresh=None)

    @app.get("/", response_class=HTMLResponse)
    async def sweeps_page(user: GetUserDep) -> HTMLResponse:
        overview = await asyncio.to_thread(_sweeps_overview, user)
        active = any(s in ACTIVE for o in overview for s in o["counts"])
        return _page("sweeps.html", sweeps=overview, refresh=REFRESH_SECONDS if active else None)

    @app.get("/sweeps/{sweep}", response_class=HTMLResponse)
    async def sweep_page(sweep: str, user: GetUserDep) -> HTMLResponse:
        view = await asyncio.to_thread(_sweep, user, sweep)
        active = any(e.state in ACTIVE for e in view.experiments)
        return _page(
            "sweep.html",
            sweep=view,
            plots=plots(view.experiments),
            analysis=analysis_plots(view.analysis),
            refresh=REFRESH_SECONDS if active else None,
        )

    @app.get("/experiments/{dag_id}", response_class=HTMLResponse)
    async def experiment_page(dag_id: str, user: GetUserDep, run_id: str | None = None) -> HTMLResponse:
        view, sweep, runs = await asyncio.to_thread(_experiment, user, dag_id, run_id)
        active = view.state in ACTIVE
        return _page(
            "experiment.html",
            e=view,
            sweep=sweep,
            runs=runs,
            plots=plots([view]),
            refresh=REFRESH_SECONDS if active else None,
        )

    @app.get("/api/sweeps")
    async def sweeps_json(user: GetUserDep) -> list[dict[str, Any]]:
        return await asyncio.to_thread(_sweeps_overview, user)

    @app.get("/api/sweeps/{sweep}")
    async def sweep_json(sweep: str, user: GetUserDep) -> dict[str, Any]:
        view = await asyncio.to_thread(_sweep, user, sweep)
        return {
            "name": view.name,
            "counts": view.counts,
            "pending": view.pending,
            # the log tails are the experiment page's: 40 lines a row would double a big sweep's answer
            "experiments": [{**_as_json(e), "log_tail": None} for e in view.experiments],
            "analysis": view.analysis,
        }

    @app.get("/api/experiments/{dag_id}")
    async def experiment_json(dag_id: str, user: GetUserDep, run_id: str | None = None) -> Any:
        view, sweep, _ = await asyncio.to_thread(_experiment, user, dag_id, run_id)
        return {"sweep": sweep, **_as_json(view)}

    return app


def _as_json(view: ExperimentView) -> dict[str, Any]:
    return {**asdict(view), "fraction": view.fraction}
