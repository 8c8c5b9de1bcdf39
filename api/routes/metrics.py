"""GET /metrics: Prometheus' text format, not behind the API key (api/services/metrics.py).

LORAQ_METRICS_ENABLED=false removes it; LORAQ_METRICS_PORT serves it from a separate small HTTP
server in the API process (on LORAQ_METRICS_HOST, default LORAQ_HOST) instead of the main app, so
a firewall can keep the scrape port apart from the API's.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, start_http_server

from api.services.metrics import make_registry, render
from loraq.settings import Settings

log = logging.getLogger("loraq.api.metrics")

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus' text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    """The service's metrics in Prometheus' text format (jobs by state, queue depth, steps/s of
    running jobs, workers, job durations and queue waits, upload bytes)."""
    return Response(render(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve /metrics as the settings say: on the app, on a port of its own, or not at all."""
    if not settings.metrics_enabled:
        return
    app.state.metrics_registry = make_registry(settings, lambda: app.state.session_factory,
                                               lambda: app.state.redis)
    if settings.metrics_port is None:
        app.include_router(router)
        return
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with inner(app) as state:  # the app's clients exist from here on
            server = _start_server(app, settings)
            try:
                yield state
            finally:
                if server is not None:
                    server.shutdown()
                    server.server_close()

    app.router.lifespan_context = lifespan


def _start_server(app: FastAPI, settings: Settings):
    host = settings.metrics_host or settings.host
    try:
        server, _thread = start_http_server(settings.metrics_port, host, app.state.metrics_registry)
    except OSError as error:  # e.g. uvicorn --workers N: the first process already serves it
        log.warning("metrics.port_unavailable %s:%s: %s; not serving /metrics from this process", host,
                    settings.metrics_port, error)
        return None
    log.info("metrics.serving http://%s:%s/metrics", host, settings.metrics_port)
    return server
