"""The FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request, Response

from heimdex_api import problems
from heimdex_api.metrics import ApiMetrics
from heimdex_api.routes import router
from heimdex_api.state import AppState
from heimdex_common.db import make_engine, make_session_factory
from heimdex_common.migrations.config import alembic_config, script_directory
from heimdex_common.settings import Settings

BODY_MAX_BYTES = 256 * 1024


def create_app(settings: Settings) -> FastAPI:
    """The API; its engine, Redis client and metrics live from startup to shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.sqlalchemy_url, pool_size=10, max_overflow=30)
        factory = make_session_factory(engine)
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1, socket_timeout=1
        )
        app.state.heimdex = AppState(
            settings=settings,
            engine=engine,
            factory=factory,
            redis=client,
            metrics=ApiMetrics(factory),
            schema_head=script_directory(alembic_config()).get_current_head(),
        )
        try:
            yield
        finally:
            client.close()
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
