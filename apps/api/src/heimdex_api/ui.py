"""The operator dashboard at /ui: pages rendered from `templates/` (Jinja2, every value
escaped) over `ledger.operations`, a small script that refreshes the live parts by polling,
every asset shipped in this package. This module holds the routes, the data each page shows,
and the session and form checks.

Sign-in takes a bearer token with an operator role once and answers with a signed, HttpOnly,
SameSite=Strict session cookie (a JWT under a key derived from `HEIMDEX_JWT_SECRET`, at most
8 hours); every form that acts (on jobs, or signing out) also carries a token derived from
that cookie. Nothing but the sign-in page and the static files is served without a session, and
every response under /ui carries `GUARDS` (a Content-Security-Policy admitting only this
package's own script and stylesheet, no framing).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import jinja2
import jwt
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heimdex.errors import HeimdexError
from heimdex.ledger import backfills, repository
from heimdex.ledger import operations as ops
from heimdex.ledger import schedules as sched
from heimdex.ledger.errors import JobNotFound
from heimdex.ledger.fingerprint import error_fingerprint
from heimdex.ledger.repository import JobFilter
from heimdex.models import JobStatus
from heimdex_api.auth import (
    ADMIN_ROLE,
    ALGORITHM,
    READONLY_ROLE,
    AuthenticationFailed,
    Principal,
    decode_token,
)
from heimdex_api.routes import State, _autocommit, _decode_cursor, _encode_cursor
from heimdex_api.state import AppState

router = APIRouter(prefix="/ui", include_in_schema=False)

COOKIE = "heimdex_session"
SESSION_SECONDS = 8 * 3600
PAGE_SIZE = 50
SELECTION_MAX = PAGE_SIZE
POLL_MS = 5000
STATIC_TYPES = {"ui.js": "text/javascript", "ui.css": "text/css"}
FILTER_FIELDS = ("status", "type", "org", "error_code", "fingerprint")
PAST = {"retry": "retried", "cancel": "canceled", "requeue": "requeued"}


class SignInRequired(Exception):
    """No valid session: the answer is the sign-in page."""


class UiForbidden(Exception):
    """A session whose role does not allow this."""


# --- sessions -------------------------------------------------------------------------------


def _key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"heimdex-ui-session", hashlib.sha256).digest()


def new_session(principal: Principal, secret: str, token_exp: int | None) -> str:
    now = int(time.time())
    exp = min(now + SESSION_SECONDS, token_exp or now + SESSION_SECONDS)
    claims = {
        "kind": "heimdex-ui",
        "sub": principal.sub,
        "org_id": str(principal.org_id),
        "role": principal.role,
        "iat": now,
        "exp": exp,
    }
    return jwt.encode(claims, _key(secret), algorithm=ALGORITHM)


def open_session(cookie: str | None, secret: str) -> Principal | None:
    """The operator a session cookie names, if it is ours, unexpired and an operator's."""
    if not cookie:
        return None
    try:
        claims = jwt.decode(
            cookie, _key(secret), algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
        principal = Principal(
            sub=str(claims["sub"]), org_id=uuid.UUID(claims["org_id"]), role=claims.get("role")
        )
    except (jwt.InvalidTokenError, KeyError, ValueError, TypeError):
        return None
    if claims.get("kind") != "heimdex-ui" or not principal.is_operator:
        return None
    return principal


def csrf_token(cookie: str, secret: str) -> str:
    return hmac.new(_key(secret), cookie.encode(), hashlib.sha256).hexdigest()[:32]


class Session:
    def __init__(self, principal: Principal, cookie: str, secret: str) -> None:
        self.principal = principal
        self.csrf = csrf_token(cookie, secret)

    @property
    def can_act(self) -> bool:
        return self.principal.is_admin


async def session(request: Request, state: State) -> Session:
    secret = state.settings.jwt_secret.get_secret_value()
    cookie = request.cookies.get(COOKIE, "")
    principal = open_session(cookie, secret)
    if principal is None:
        raise SignInRequired
    return Session(principal, cookie, secret)


Operator = Annotated[Session, Depends(session)]


def _same_dashboard(s: Session, form: Mapping[str, str]) -> None:
    """Refuse a form that does not carry the session's token: another site can make the
    browser send the cookie, but cannot read the token off our pages."""
    if not hmac.compare_digest(form.get("csrf", "").encode(), s.csrf.encode()):
        raise UiForbidden("the form is stale or not from this dashboard; reload the page")


def _admin(s: Session, form: Mapping[str, str]) -> None:
    _same_dashboard(s, form)
    if not s.can_act:
        raise UiForbidden(
            f"changing jobs needs the {ADMIN_ROLE} role (you have {s.principal.role})"
        )


async def _form_lists(request: Request) -> dict[str, list[str]]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return parse_qs(body, keep_blank_values=True)


async def _form(request: Request) -> dict[str, str]:
    return {k: v[-1] for k, v in (await _form_lists(request)).items()}


# --- rendering ------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _ago(value: datetime | None) -> str:
    if value is None:
        return ""
    seconds = max(0, int((datetime.now(UTC) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _url(path: str, **params: object) -> str:
    clean = {k: v for k, v in params.items() if v not in (None, "")}
    return path + ("?" + urlencode(clean) if clean else "")


def _pretty_json(value: object) -> str:
    return json.dumps(value, indent=2)


def templates() -> Jinja2Templates:
    """The dashboard's templates. Every one is escaped: data reaches a page only as text."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("heimdex_api", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # they ship in the package: no stat per render
    )
    env.filters.update(when=_when, ago=_ago, short=lambda v: str(v)[:8], pretty_json=_pretty_json)
    env.globals.update(
        url=_url, poll_ms=POLL_MS, admin_role=ADMIN_ROLE, readonly_role=READONLY_ROLE
    )
    return Jinja2Templates(env=env)


def _page(
    request: Request,
    name: str,
    title: str,
    s: Session | None,
    *,
    status: int = 200,
    notice: bool = False,
    **context: object,
) -> HTMLResponse:
    """`name` rendered in the layout; with `notice`, the outcome of the last action (from the
    query string) above the content."""
    ui_templates: Jinja2Templates = request.app.state.ui_templates
    return ui_templates.TemplateResponse(
        request,
        name,
        {
            "title": title,
            "s": s,
            "notice": request.query_params.get("notice") if notice else None,
            **context,
        },
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def _message(
    request: Request, title: str, message: str, s: Session | None, status: int
) -> HTMLResponse:
    return _page(request, "message.html", title, s, status=status, message=message)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    ago: int
    value: int


@dataclass(frozen=True)
class Chart:
    """One bar per minute of `kind` ("succeeded" or "failed"), oldest left."""

    kind: str
    top: int
    bars: list[Bar]
    width: int = 720
    height: int = 90


def _chart(minutes: Sequence[repository.Minute], kind: str) -> Chart:
    values: list[int] = [getattr(m, kind) for m in reversed(minutes)]
    chart = Chart(kind, max([*values, 1]), [])
    step = chart.width / max(1, len(values))
    for i, value in enumerate(values):
        h = value / chart.top * (chart.height - 14)
        chart.bars.append(
            Bar(i * step, chart.height - h, step * 0.8, h, len(values) - 1 - i, value)
        )
    return chart


# --- filters --------------------------------------------------------------------------------


def _filter_of(
    params: Mapping[str, str], ids: Sequence[str] = ()
) -> tuple[JobFilter, dict[str, str], list[str], list[str]]:
    """The job filter a query string states (with `ids`, the jobs selected), its clean values,
    what was refused, and the selected ids."""
    problems: list[str] = []
    selected: list[str] = []
    for raw in ids[:SELECTION_MAX]:
        try:
            selected.append(str(uuid.UUID(raw)))
        except ValueError:
            problems.append(f"{raw!r} is not a job id")
    if len(ids) > SELECTION_MAX:
        problems.append(f"select at most {SELECTION_MAX} jobs, or use a filter")
    clean: dict[str, str] = {}
    status: tuple[JobStatus, ...] = ()
    org: uuid.UUID | None = None
    raw_status = params.get("status", "").strip()
    if raw_status:
        try:
            status = (JobStatus(raw_status),)
            clean["status"] = raw_status
        except ValueError:
            problems.append(f"unknown state {raw_status!r}")
    raw_org = params.get("org", "").strip()
    if raw_org:
        try:
            org = uuid.UUID(raw_org)
            clean["org"] = str(org)
        except ValueError:
            problems.append(f"org {raw_org!r} is not a UUID")
    text_fields = {}
    for name in ("type", "error_code", "fingerprint"):
        value = params.get(name, "").strip()[:100]
        if value:
            clean[name] = value
            text_fields[name] = value
    return (
        JobFilter(
            ids=tuple(uuid.UUID(i) for i in selected) if selected else None,
            statuses=status,
            org_id=org,
            type=text_fields.get("type"),
            error_code=text_fields.get("error_code"),
            error_fingerprint=text_fields.get("fingerprint"),
        ),
        clean,
        problems,
        selected,
    )


# --- pages ----------------------------------------------------------------------------------

STATES = tuple(x.value for x in JobStatus)


def _overview(conn: Connection, org: uuid.UUID | None) -> dict[str, Any]:
    st = ops.stats(conn, org_id=org, minutes=60)
    by_org = sorted(st.by_org.items(), key=lambda kv: -kv[1].get("queued", 0))[:50]
    return {
        "org": org,
        "st": st,
        "states": STATES,
        "groups": ops.failures(conn, org_id=org, limit=10),
        "succeeded": sum(m.succeeded for m in st.throughput),
        "failed": sum(m.failed for m in st.throughput),
        "charts": [_chart(st.throughput, "succeeded"), _chart(st.throughput, "failed")],
        "by_org": by_org if org is None else [],
        "by_type": sorted(st.by_type.items()),
    }


def _reads(state: AppState) -> Connection:
    """A read that accepts lag (overview, lists, failures): the replica while it is within its
    bound. A job's page and a bulk preview read the primary: they come right before or after
    an action."""
    return state.reads.connect().execution_options(isolation_level="AUTOCOMMIT")


def _replica(state: AppState) -> str | None:
    """What the overview says of the read replica, if there is one."""
    reads = state.reads
    if reads.replica is None:
        return None
    if reads.lag is None:
        return "read replica unreachable: reading the primary"
    where = "reading the primary" if reads.engine() is reads.primary else "reading it"
    return f"read replica {reads.lag:.1f} s behind: {where}"


@router.get("")
def overview(request: Request, state: State, s: Operator) -> HTMLResponse:
    with _reads(state) as conn:
        context = _overview(conn, None)
    return _page(
        request, "overview.html", "Overview", s, notice=True, replica=_replica(state), **context
    )


@router.get("/orgs/{org_id}")
def org_page(org_id: uuid.UUID, request: Request, state: State, s: Operator) -> HTMLResponse:
    with _reads(state) as conn:
        context = _overview(conn, org_id)
        recent = repository.list_jobs_ops(conn, JobFilter(org_id=org_id), limit=20)
    return _page(request, "org.html", f"Org {org_id}", s, notice=True, recent=recent, **context)


@router.get("/jobs")
def jobs(request: Request, state: State, s: Operator) -> HTMLResponse:
    params = dict(request.query_params)
    f, clean, problems, _ = _filter_of(params)
    cursor = params.get("cursor")
    try:
        before = _decode_cursor(cursor) if cursor else None
    except HeimdexError:
        problems.append("that page link is stale; back to the first page")
        before = None
    with _reads(state) as conn:
        rows = repository.list_jobs_ops(conn, f, limit=PAGE_SIZE + 1, before=before)
    page = rows[:PAGE_SIZE]
    next_url = None
    if len(rows) > PAGE_SIZE:
        next_cursor = _encode_cursor(page[-1].created_at, page[-1].id)
        next_url = _url("/ui/jobs", **clean, cursor=next_cursor)
    actions = [a.value for a in ops.Action]
    return _page(
        request,
        "jobs.html",
        "Jobs",
        s,
        notice=True,
        jobs=page,
        clean=clean,
        problems=problems,
        states=STATES,
        first_url=_url("/ui/jobs", **clean) if before else None,
        next_url=next_url,
        bulk=[(a, _url("/ui/bulk", action=a, **clean)) for a in actions]
        if s.can_act and clean
        else [],
        selection=actions if s.can_act and page else [],
    )


@router.get("/jobs/{job_id}")
def job_page(job_id: uuid.UUID, request: Request, state: State, s: Operator) -> HTMLResponse:
    try:
        with _autocommit(state) as conn:
            job = repository.get_job(conn, job_id)
            events = repository.list_events(conn, job_id)
    except JobNotFound:
        return _message(request, "Job not found", f"No job {job_id}.", s, 404)
    fingerprint = (
        error_fingerprint(job.last_error_code, job.last_error_message)
        if job.last_error_code or job.last_error_message
        else None
    )
    return _page(
        request,
        "job.html",
        f"Job {str(job.id)[:8]}",
        s,
        notice=True,
        job=job,
        events=events,
        fingerprint=fingerprint,
        actions=[a.value for a in ops.Action if job.status in ops.TARGETS[a]],
        stuck=sum(1 for e in events if (e.detail_json or {}).get("stuck")),
    )


@router.post("/jobs/{job_id}/{action}")
async def job_action(
    job_id: uuid.UUID, action: ops.Action, request: Request, state: State, s: Operator
) -> Response:
    form = await _form(request)
    _admin(s, form)

    def run() -> str:
        with state.engine.begin() as conn:
            job = ops.operate(
                conn, action, job_id, ops.Operator(s.principal.sub, form.get("reason")),
                from_scratch=action is ops.Action.RETRY and form.get("from_scratch") == "1",
            )  # fmt: skip
        return f"{PAST[action.value]}: now {job.status.value}"

    try:
        notice = await run_in_threadpool(run)
    except HeimdexError as exc:
        notice = f"not done: {exc}"
    return RedirectResponse(_url(f"/ui/jobs/{job_id}", notice=notice), status_code=303)


@router.get("/failures")
def failures(request: Request, state: State, s: Operator) -> HTMLResponse:
    showing = "failed" if request.query_params.get("status") == "failed" else "dead_letter"
    with _reads(state) as conn:
        groups = ops.failures(conn, statuses=[JobStatus(showing)], limit=200)
    return _page(
        request, "failures.html", "Failures", s, notice=True, groups=groups, showing=showing
    )


@router.get("/schedules")
def schedules_page(request: Request, state: State, s: Operator) -> HTMLResponse:
    """Every org's periodic schedules by next fire time, with their last job."""
    with _reads(state) as conn:
        found = sched.list_schedules(conn)
    return _page(request, "schedules.html", "Schedules", s, schedules=found)


@router.get("/backfills")
def backfills_page(request: Request, state: State, s: Operator) -> HTMLResponse:
    """The backfills data revisions handed to the ledger, with their progress."""
    with _reads(state) as conn:
        found = backfills.progress(conn)
    return _page(request, "backfills.html", "Backfills", s, backfills=found)


@router.get("/bulk")
def bulk_preview(request: Request, state: State, s: Operator) -> HTMLResponse:
    try:
        action = ops.Action(request.query_params.get("action", ""))
    except ValueError:
        return _message(request, "Bulk action", "Unknown action.", s, 400)
    if not s.can_act:
        raise UiForbidden(f"bulk actions need the {ADMIN_ROLE} role (you have {s.principal.role})")
    f, clean, problems, selected = _filter_of(
        dict(request.query_params), request.query_params.getlist("id")
    )
    if problems:
        return _message(request, "Bulk action", "; ".join(problems), s, 400)
    try:
        with _autocommit(state) as conn:
            count = ops.preview(conn, action, f)
    except HeimdexError as exc:
        return _message(request, "Bulk action", str(exc), s, 400)
    return _page(
        request,
        "bulk.html",
        f"{action.value.capitalize()} jobs",
        s,
        action=action.value,
        past=PAST[action.value],
        count=count,
        clean=clean,
        selected=selected,
    )


@router.post("/bulk")
async def bulk_run(request: Request, state: State, s: Operator) -> Response:
    lists = await _form_lists(request)
    form = {k: v[-1] for k, v in lists.items()}
    _admin(s, form)
    f, clean, problems, _ = _filter_of(form, lists.get("id", []))
    try:
        action = ops.Action(form.get("action", ""))
        if problems:
            raise HeimdexError("; ".join(problems))
        result = await run_in_threadpool(
            ops.bulk, state.engine, action, f, ops.Operator(s.principal.sub, form.get("reason"))
        )
        notice = (
            f"{PAST[action.value].capitalize()} {result.jobs} jobs in {result.batches} batches."
        )
    except (HeimdexError, ValueError) as exc:
        notice = f"Not done: {exc}"
    clean.pop("status", None)  # the jobs have left the state they were picked in
    return RedirectResponse(_url("/ui/jobs", **clean, notice=notice), status_code=303)


# --- sign-in --------------------------------------------------------------------------------


def _signin_page(
    request: Request, message: str = "", status: int = 200, next_url: str = "/ui"
) -> HTMLResponse:
    return _page(
        request, "signin.html", "Sign in", None, status=status, message=message, next_url=next_url
    )


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/ui") and not value.startswith("//"):
        return value
    return "/ui"


@router.get("/signin")
def signin_form(request: Request) -> HTMLResponse:
    return _signin_page(request, next_url=_safe_next(request.query_params.get("next")))


@router.post("/signin")
async def signin(request: Request, state: State) -> Response:
    form = await _form(request)
    next_url = _safe_next(form.get("next"))
    secret = state.settings.jwt_secret.get_secret_value()
    token = form.get("token", "").strip().removeprefix("Bearer ").strip()
    try:
        principal = decode_token(token, secret)
    except AuthenticationFailed as exc:
        return _signin_page(request, str(exc), 401, next_url)
    if not principal.is_operator:
        return _signin_page(
            request,
            f"this token has no operator role (role: {principal.role or 'none'}); the dashboard "
            f"needs {ADMIN_ROLE} or {READONLY_ROLE}",
            403,
            next_url,
        )
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    cookie = new_session(principal, secret, exp if isinstance(exp, int) else None)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        COOKIE, cookie, max_age=SESSION_SECONDS, path="/ui", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@router.post("/signout")
async def signout(request: Request, s: Operator) -> Response:
    _same_dashboard(s, await _form(request))
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC_TYPES:
        return Response("not found", status_code=404, media_type="text/plain")
    data = (resources.files("heimdex_api") / "static" / name).read_bytes()
    return Response(data, media_type=STATIC_TYPES[name], headers={"Cache-Control": "max-age=300"})


async def _to_signin(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        target = "/ui"
    return RedirectResponse(_url("/ui/signin", next=target), status_code=303)


async def _forbidden(request: Request, exc: Exception) -> Response:
    return _message(request, "Forbidden", str(exc), None, 403)


# Pages that run only their own script and stylesheet, talk only to their own origin and are
# never framed: markup that slipped into a page could neither run nor send anything away.
GUARDS = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        b"object-src 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


class BrowserGuards:
    """Plain ASGI: adds `GUARDS` to every response under /ui, whoever answers it (a page, a
    redirect, a static file, a refusal before the route)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/ui" or path.startswith("/ui/")):
            await self.app(scope, receive, send)
            return

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *GUARDS]
            await send(message)

        await self.app(scope, receive, guarded_send)


def install(app: FastAPI) -> None:
    """The dashboard's routes and error pages; `BrowserGuards` is added by the app factory,
    outside every other middleware."""
    app.state.ui_templates = templates()
    app.include_router(router)
    app.add_exception_handler(SignInRequired, _to_signin)
    app.add_exception_handler(UiForbidden, _forbidden)
