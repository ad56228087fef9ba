"""The FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heimdex_api import problems
from heimdex_api.metrics import ApiMetrics
from heimdex_api.routes import router
from heimdex_api.state import AppState
from heimdex_common.db import make_engine
from heimdex_common.ledger.registry import load_registry
from heimdex_common.logs import configure_logging
from heimdex_common.migrations.config import alembic_config, script_directory
from heimdex_common.settings import Settings, load_settings

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

    app.add_middleware(GuardAndCount)
    return app


def app_from_environment() -> FastAPI:
    """The app of one server process started by `heimdex api --workers N` (each process
    reads the settings and sets up its logging itself)."""
    settings = load_settings()
    configure_logging("api", **settings.log_options)
    return create_app(settings)


class GuardAndCount:
    """Refuses an oversized declared body up front and counts every request by route and
    status. Plain ASGI: no per-request task or body streaming of its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > BODY_MAX_BYTES):
            response = problems.problem(
                413, "body-too-large", f"request body over {BODY_MAX_BYTES} bytes", Request(scope)
            )
            await response(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        await self.app(scope, receive, send_and_note)
        state: AppState | None = getattr(scope["app"].state, "heimdex", None)
        if state is not None:
            path = getattr(scope.get("route"), "path", "unmatched")
            state.metrics.requests.labels(scope["method"], path, status).inc()
            state.metrics.latency.labels(scope["method"], path).observe(
                time.perf_counter() - started
            )
