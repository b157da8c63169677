"""The dashboard's FastAPI app, mounted in the Airflow api-server at `/oellm` by the provider's plugin.

Pages (HTML, drawn on the server) and their JSON twins; every request is authenticated by Airflow's
own auth manager (the UI's `_token` cookie or a bearer token) and shows only DAGs the user may read.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlparse

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.configuration import conf
from airflow.utils.session import create_session
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from airflow_oellm.config.naming import experiment_name
from airflow_oellm.dashboard import queries
from airflow_oellm.dashboard.model import (
    MAX_PER_PAGE,
    PER_PAGE,
    SORTS,
    SWEEP_CURVE_POINTS,
    ExperimentView,
    LiveReports,
    SweepRequest,
    SweepView,
    experiment_view,
    state_counts,
    sweep_page,
    sweep_view,
)
from airflow_oellm.dashboard.plot import DISCARDED, PALETTE, Series, line_plot, step_points
from airflow_oellm.dashboard.urls import URL_PREFIX

REFRESH_SECONDS = 20  # pages of something still running reload themselves this often
ACTIVE = frozenset({"running", "queued", "retrying"})
# the distributions' colours, near the state badges'
STATE_COLORS = {
    "running": PALETTE[0],
    "retrying": PALETTE[1],
    "success": PALETTE[2],
    "failed": PALETTE[3],
    "queued": PALETTE[4],
    "stopped early": PALETTE[7],
}
LIVE_REPORTS = LiveReports()


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


def distribution_plots(distributions: Mapping[str, Any]) -> dict[str, Any]:
    """How every experiment's latest train loss and progress spread (model.distributions): one histogram's
    outline per state."""
    states = list(dict.fromkeys(s for d in distributions.values() for s in d["counts"]))
    colors = {s: STATE_COLORS.get(s, PALETTE[-1]) for s in states}
    drawn: dict[str, Any] = {"legend": [(s, colors[s], False, True) for s in states]}
    for name, label in (("loss", "latest train loss"), ("progress", "progress (% of train_iters)")):
        edges, counts = distributions[name]["edges"], distributions[name]["counts"]
        series = [Series(state, step_points(edges, n), colors[state]) for state, n in counts.items()]
        drawn[name] = line_plot(f"{name}-distribution", series, label, "experiments")
    return drawn


@dataclass(frozen=True)
class SweepLinks:
    """A sweep page's links to itself: another sort, page or selection; the rest of the request kept."""

    path: str
    request: SweepRequest

    def href(self, request: SweepRequest) -> str:
        default = SweepRequest()
        query = [
            (name, value)
            for name, value, usual in (
                ("sort", request.sort, default.sort),
                ("page", request.page, default.page),
                ("per_page", request.per_page, default.per_page),
            )
            if value != usual
        ]
        query += [("selected", dag_id) for dag_id in request.selected]
        return self.path + (f"?{urlencode(query)}" if query else "")

    def sort(self, key: str) -> str:
        """Sorted by `key`: ascending, or the other way round if so already; from the first page."""
        flipped = f"-{key}" if self.request.sort == key else key
        return self.href(replace(self.request, sort=flipped, page=1))

    def arrow(self, key: str) -> str:
        return {key: " ▲", f"-{key}": " ▼"}.get(self.request.sort, "")

    def page(self, page: int) -> str:
        return self.href(replace(self.request, page=page))

    def per_page(self, per_page: int) -> str:
        """`per_page` rows, from the page that holds the current first row."""
        first = (self.request.page - 1) * self.request.per_page
        return self.href(replace(self.request, per_page=per_page, page=first // per_page + 1))

    def toggle(self, dag_id: str) -> str:
        """With `dag_id` selected, or without it if it is."""
        selected = self.request.selected
        toggled = tuple(d for d in selected if d != dag_id) if dag_id in selected else (*selected, dag_id)
        return self.href(replace(self.request, selected=toggled))

    def clear(self) -> str:
        return self.href(replace(self.request, selected=()))


def sweep_drawing(view: SweepView, path: str) -> dict[str, Any]:
    """What sweep.html draws of a sweep page's view (`path`: the page's own, for its links)."""
    return {
        "sweep": view,
        "links": SweepLinks(path, view.page.request),
        "plots": plots(view.drawn),
        "curve_points": SWEEP_CURVE_POINTS,
        "distributions": distribution_plots(view.distributions),
        "analysis": analysis_plots(view.analysis),
    }


def sweep_request(
    page: Annotated[int, Query(ge=1, description="the page, from 1")] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = PER_PAGE,
    sort: Annotated[str, Query(pattern=f"^-?({'|'.join(SORTS)})$", description="'-' before it: descending")] = "name",
    selected: Annotated[list[str] | None, Query(description="experiment DAG ids whose curves to draw")] = None,
) -> SweepRequest:
    return SweepRequest(sort, page, per_page, tuple(selected or ()))


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def allowed_dags(user: BaseUser) -> set[str]:
    return get_auth_manager().get_authorized_dag_ids(user=user, method="GET")


def _page(name: str, **values: Any) -> HTMLResponse:
    values.setdefault("root", ui_root())
    values.setdefault("prefix", ui_root() + URL_PREFIX)
    return HTMLResponse(templates.get_template(name).render(**values))


def sweeps_overview(allowed: Collection[str] | None) -> list[dict[str, Any]]:
    """Every sweep with its experiments' latest runs counted by state: two queries, whatever the count."""
    with create_session() as session:
        found = queries.sweeps(session, allowed)
        states = queries.run_states(session, [d for ids in found.values() for d in ids])
    return [
        {
            "name": name,
            "experiments": len(dag_ids),
            "counts": state_counts(states.get(dag_id) or "never run" for dag_id in dag_ids),
        }
        for name, dag_ids in found.items()
    ]


def sweep_data(allowed: Collection[str] | None, sweep: str, request: SweepRequest) -> SweepView:
    """A sweep page: every experiment's status from light records, whole records of the page's rows and the
    selected experiments only, every run's live report (LIVE_REPORTS: read again when it changed). A fixed
    number of queries, whatever the number of experiments."""
    with create_session() as session:
        dag_ids = queries.sweeps(session, allowed).get(sweep)
        if not dag_ids:
            raise HTTPException(404, f"no sweep named {sweep!r} (or none of its DAGs is readable for you)")
        latest = queries.latest_runs(session, dag_ids)
        now = time.time()
        light = queries.run_statuses(session, latest)
        page = sweep_page(sweep, {dag_id: light.get(dag_id) for dag_id in dag_ids}, request, now)
        records = queries.run_records(session, [latest[d][0] for d in page.wanted if d in latest])
        names = {s.dag_id: s.name for s in page.statuses}
        runs = {latest[d][0]: names[d] for d in dag_ids if d in latest}
        versions = queries.report_versions(session, list(runs))
        reports = LIVE_REPORTS.reports(versions, runs, lambda pks: queries.report_records(session, pks))
    whole = {d: records.get(latest[d][0]) if d in latest else None for d in page.wanted}
    return sweep_view(page, whole, reports, now)


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
        overview = await asyncio.to_thread(sweeps_overview, allowed_dags(user))
        active = any(s in ACTIVE for o in overview for s in o["counts"])
        return _page("sweeps.html", sweeps=overview, refresh=REFRESH_SECONDS if active else None)

    @app.get("/sweeps/{sweep}", response_class=HTMLResponse)
    async def sweep_page_html(
        sweep: str, user: GetUserDep, request: Annotated[SweepRequest, Depends(sweep_request)]
    ) -> HTMLResponse:
        view = await asyncio.to_thread(sweep_data, allowed_dags(user), sweep, request)
        active = any(e.state in ACTIVE for e in view.statuses)
        path = f"{ui_root()}{URL_PREFIX}/sweeps/{quote(sweep, safe='')}"
        return _page("sweep.html", **sweep_drawing(view, path), refresh=REFRESH_SECONDS if active else None)

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
        return await asyncio.to_thread(sweeps_overview, allowed_dags(user))

    @app.get("/api/sweeps/{sweep}")
    async def sweep_json(
        sweep: str, user: GetUserDep, request: Annotated[SweepRequest, Depends(sweep_request)]
    ) -> dict[str, Any]:
        view = await asyncio.to_thread(sweep_data, allowed_dags(user), sweep, request)
        page = view.page.request
        return {
            "name": view.name,
            "counts": view.counts,
            "pending": view.pending,
            "total": view.page.total,
            "page": page.page,
            "per_page": page.per_page,
            "pages": view.page.pages,
            "sort": page.sort,
            "selected": list(page.selected),
            # the log tails are the experiment page's: 40 lines a row would double a big sweep's answer
            "experiments": [{**_as_json(e), "log_tail": None} for e in view.experiments],
            "selected_experiments": [{**_as_json(e), "log_tail": None} for e in view.selected],
            "distributions": view.distributions,
            "analysis": view.analysis,
        }

    @app.get("/api/experiments/{dag_id}")
    async def experiment_json(dag_id: str, user: GetUserDep, run_id: str | None = None) -> Any:
        view, sweep, _ = await asyncio.to_thread(_experiment, user, dag_id, run_id)
        return {"sweep": sweep, **_as_json(view)}

    return app


def _as_json(view: ExperimentView) -> dict[str, Any]:
    return {**asdict(view), "fraction": view.fraction}
