"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heimdex.db import make_engine
from heimdex.ledger.registry import load_registry
from heimdex.logs import configure_logging
from heimdex.replica import make_read_engines
from heimdex.settings import Settings, load_settings
from heimdex_api import ops, ops_control, problems, ui
from heimdex_api.auth import PRINCIPAL_KEY, AuthenticationFailed, bearer, decode_token
from heimdex_api.inputs import storable_input
from heimdex_api.metrics import ApiMetrics
from heimdex_api.routes import router
from heimdex_api.state import AppState
from heimdex_db.head import head_revision, known_revisions

BODY_MAX_BYTES = 256 * 1024


def create_app(settings: Settings) -> FastAPI:
    """The API; its engine, job-type registry and metrics live from startup to shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = load_registry(settings.job_module_specs)
        engine = make_engine(
            settings.sqlalchemy_url, pool_mode=settings.pool_mode, pool_size=10, max_overflow=30
        )
        reads = make_read_engines(settings, engine, pool_size=5, max_overflow=10)
        app.state.heimdex = AppState(
            settings=settings,
            engine=engine,
            reads=reads,
            registry=registry,
            metrics=ApiMetrics(engine, reads),
            schema_head=head_revision(),
            schema_known=known_revisions(),
        )
        try:
            yield
        finally:
            reads.dispose()
            engine.dispose()

    app = FastAPI(
        title="Heimdex",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(storable_input)],
    )
    problems.install(app)
    app.include_router(router)
    app.include_router(ops.router)
    app.include_router(ops_control.router)
    ui.install(app)

    app.add_middleware(GuardAndCount, body_timeout=settings.body_timeout_seconds)
    app.add_middleware(ui.BrowserGuards)
    return app


def app_from_environment() -> FastAPI:
    """The app of one server process started by `heimdex api --workers N` (each process
    reads the settings and sets up its logging itself)."""
    settings = load_settings()
    configure_logging("api", **settings.log_options)
    return create_app(settings)


# Served without a token; every other route needs one, checked before its body is read.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"})


class BodyTooLarge(StarletteHTTPException):
    """Raised by the guarded `receive` once the body passes the limit. An HTTPException, so
    FastAPI's body parsing passes it through as is and problems.py answers 413."""

    def __init__(self) -> None:
        super().__init__(413, f"request body over {BODY_MAX_BYTES} bytes")


class BodyTimeout(StarletteHTTPException):
    """Raised by the guarded `receive` when the body has not arrived within the timeout. The
    answer closes the connection: the rest of the body may never come."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"the request body did not arrive within {seconds:g} s", {"Connection": "close"}
        )


class GuardAndCount:
    """Plain ASGI (no per-request task, no buffering of its own): authenticates protected
    routes before their body is read, enforces the body limit on the bytes as they arrive
    (chunked bodies have no Content-Length) and the body timeout from the request's start, and
    counts every request by route and status."""

    def __init__(self, app: ASGIApp, body_timeout: float) -> None:
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        status = 500
        received = 0
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later reads wait for the disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > BODY_MAX_BYTES:
                    raise BodyTooLarge
                body_done = not message.get("more_body", False)
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        await self.app(scope, guarded_receive, send_and_note)
        state: AppState | None = getattr(scope["app"].state, "heimdex", None)
        if state is not None:
            path = getattr(scope.get("route"), "path", "unmatched")
            state.metrics.requests.labels(scope["method"], path, status).inc()
            state.metrics.latency.labels(scope["method"], path).observe(
                time.perf_counter() - started
            )

    @staticmethod
    def refusal(scope: Scope) -> JSONResponse | None:
        """The answer to a request refused before the application sees it, if it is one."""
        request = Request(scope)
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > BODY_MAX_BYTES):
            return problems.problem(
                413, "body-too-large", f"request body over {BODY_MAX_BYTES} bytes", request
            )
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        state: AppState | None = getattr(scope["app"].state, "heimdex", None)
        if has_body and state is not None and scope["path"].startswith("/ui"):
            # The dashboard's forms carry its session cookie, not a bearer token; only the
            # sign-in form is read without one.
            secret = state.settings.jwt_secret.get_secret_value()
            cookie = Request(scope).cookies.get(ui.COOKIE)
            if scope["path"] != "/ui/signin" and ui.open_session(cookie, secret) is None:
                return problems.problem(401, "unauthenticated", "sign in at /ui/signin", request)
            return None
        if has_body and state is not None and scope["path"] not in PUBLIC_PATHS:
            # FastAPI reads and parses the whole body before it solves any dependency, so
            # the route's own token check would come only after the body is in memory.
            try:
                principal = decode_token(
                    bearer(headers.get("authorization")),
                    state.settings.jwt_secret.get_secret_value(),
                )
            except AuthenticationFailed as exc:
                return problems.problem(401, "unauthenticated", str(exc), request)
            # The route's `principal` dependency takes it from here instead of decoding the
            # same token again.
            scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        return None
