"""The application factory: wires routers, the one error handler and the shared clients."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import kombu.exceptions
import redis
import redis.asyncio
import sqlalchemy.exc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.deps import get_principal
from api.routes import artifacts, datasets, events, health, jobs, keys, models
from api.routes import job_actions, metrics, pages, webhooks, workers
from api.schemas import AUTH_ERRORS
from loraq.auth import admin_key_path, ensure_admin_key
from loraq.db import make_engine, make_session_factory
from loraq.errors import AppError, ServiceUnavailable, unavailable_store
from loraq.queue import make_celery
from loraq.settings import Settings

log = logging.getLogger("loraq.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (read from the environment when not given)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                               socket_timeout=10, health_check_interval=30)
        # Event streams wait on Redis without holding a thread: threads are for the sync routes.
        app.state.async_redis = redis.asyncio.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                                             socket_timeout=10, health_check_interval=30)
        app.state.celery = make_celery(settings)
        announce_admin_key(settings, ensure_admin_key(settings, app.state.session_factory))
        try:
            yield
        finally:
            app.state.celery.close()
            app.state.redis.close()
            await app.state.async_redis.aclose()
            engine.dispose()

    app = FastAPI(title="loraq", version="0.1.0", lifespan=lifespan,
                  description="Train LoRA adapters for Stable Diffusion as queued jobs.")
    app.state.settings = settings
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # The stores' errors are handled here rather than only as "unexpected" (Starlette re-raises
    # those after answering): an outage is a 503 naming the store, and no traceback in the log.
    for store_error in (sqlalchemy.exc.SQLAlchemyError, redis.RedisError, kombu.exceptions.KombuError):
        app.add_exception_handler(store_error, _unexpected_error)
    app.add_exception_handler(Exception, _unexpected_error)
    # Every /v1 route needs a key; pages and /healthz do not.
    for module in (datasets, jobs, job_actions, events, artifacts, models, keys, webhooks, workers):
        app.include_router(module.router, prefix="/v1", dependencies=[Depends(get_principal)],
                           responses=AUTH_ERRORS)
    app.include_router(health.router)
    metrics.install(app, settings)  # GET /metrics (Prometheus), not behind the key; off or on its own port
    app.include_router(pages.router)
    pages.mount_static(app)
    return app


def announce_admin_key(settings: Settings, secret: str | None) -> None:
    """Print the first admin key once, the moment it is created (it is also in the key file)."""
    if secret is None:
        return
    path = admin_key_path(settings)
    print(f"loraq: created the first admin API key; it is saved in {path} (mode 0600):\n  {secret}",
          flush=True)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status,
                        headers=headers)


async def _app_error(request: Request, error: AppError) -> JSONResponse:
    return error_response(error.status, error.message, error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(422, describe_validation_errors(error.errors()))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    headers = getattr(error, "headers", None)
    if error.status_code == 405:
        # The router's Allow names only the first route on the path; list every method the path has.
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error_response(error.status_code, str(error.detail), headers)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    store = unavailable_store(error)
    if store is not None:  # an outage, not a bug: 503 naming the store, and the client retries
        log.warning("api.store_unavailable %s %s store=%s: %s", request.method, request.url.path, store, error)
        return await _app_error(request, ServiceUnavailable(store))
    log.exception("api.unexpected_error %s %s", request.method, request.url.path, exc_info=error)
    return error_response(500, "internal error; the server log has the details")


def allowed_methods(request: Request) -> str:
    """`DELETE, GET`: the methods some route answers on the request's path (asked route by route)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {"type": "http", "method": method, "path": request.scope["path"], "headers": [],
                 "root_path": request.scope.get("root_path", ""), "query_string": b""}
        if any(route.matches(dict(scope))[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def describe_validation_errors(errors) -> str:
    """One `field: problem` per error, e.g. `dataset_id: Field required; query.limit: ...`."""
    lines = []
    for item in errors:
        loc = [str(part) for part in item.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        field = ".".join(loc) or "body"
        lines.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(lines) or "invalid request"
