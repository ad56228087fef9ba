"""The FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from heimdex_api import problems
from heimdex_api.metrics import ApiMetrics
from heimdex_api.routes import router
from heimdex_api.state import AppState
from heimdex_common.db import make_engine
from heimdex_common.ledger.registry import load_registry
from heimdex_common.migrations.config import alembic_config, script_directory
from heimdex_common.settings import Settings

BODY_MAX_BYTES = 256 * 1024


def create_app(settings: Settings) -> FastAPI:
    """The API; its engine, job-type registry and metrics live from startup to shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = load_registry(settings.job_module_specs)
        engine = make_engine(settings.sqlalchemy_url, pool_size=10, max_overflow=30)
        app.state.heimdex = AppState(
            settings=settings,
            engine=engine,
            registry=registry,
            metrics=ApiMetrics(engine),
            schema_head=script_directory(alembic_config()).get_current_head(),
        )
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(title="Heimdex", version="0.1.0", lifespan=lifespan)
    problems.install(app)
    app.include_router(router)

    @app.middleware("http")
    async def guard_and_count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > BODY_MAX_BYTES):
            return problems.problem(
                413, "body-too-large", f"request body over {BODY_MAX_BYTES} bytes", request
            )
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state: AppState | None = getattr(request.app.state, "heimdex", None)
        if state is not None:
            state.metrics.requests.labels(request.method, path, response.status_code).inc()
            state.metrics.latency.labels(request.method, path).observe(
                time.perf_counter() - started
            )
        return response

    return app
