"""The operator dashboard at /ui: server-rendered pages over `ledger.operations`, a small script
that refreshes the live parts by polling, every asset shipped in this package.

Sign-in takes a bearer token with an operator role once and answers with a signed, HttpOnly,
SameSite=Strict session cookie (a JWT under a key derived from `HEIMDEX_JWT_SECRET`, at most
8 hours); forms that change jobs also carry a token derived from that cookie. Nothing but the
sign-in page and the static files is served without a session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import jwt
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from heimdex.errors import HeimdexError
from heimdex.ledger import operations as ops
from heimdex.ledger import repository
from heimdex.ledger.errors import JobNotFound
from heimdex.ledger.fingerprint import error_fingerprint
from heimdex.ledger.repository import JobFilter, JobRow
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


def _admin(s: Session, form: Mapping[str, str]) -> None:
    if not hmac.compare_digest(form.get("csrf", ""), s.csrf):
        raise UiForbidden("the form is stale or not from this dashboard; reload the page")
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


def _e(value: object) -> str:
    return escape("" if value is None else str(value))


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


def _badge(status: str) -> str:
    return f'<span class="badge s-{_e(status)}">{_e(status)}</span>'


def _org(org_id: uuid.UUID | str) -> str:
    return f'<a class="mono" href="/ui/orgs/{_e(org_id)}">{_e(str(org_id)[:8])}</a>'


def _job_link(job_id: uuid.UUID | str) -> str:
    return f'<a class="mono" href="/ui/jobs/{_e(job_id)}">{_e(str(job_id)[:8])}</a>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str, s: Session | None, *, status: int = 200) -> HTMLResponse:
    nav = ""
    if s is not None:
        role = "admin" if s.can_act else "read-only"
        nav = f"""<nav>
  <a href="/ui">Overview</a><a href="/ui/jobs">Jobs</a><a href="/ui/failures">Failures</a>
  <span class="who">{_e(s.principal.sub)} <small>({role})</small></span>
  <form method="post" action="/ui/signout" class="inline">
    <input type="hidden" name="csrf" value="{s.csrf}"><button>Sign out</button></form>
</nav>"""
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · Heimdex</title>
<link rel="stylesheet" href="/ui/static/ui.css">
<script src="/ui/static/ui.js" defer></script>
</head><body data-poll="{POLL_MS if s else 0}">
<header><a class="brand" href="/ui">Heimdex</a>{nav}</header>
<main><h1>{_e(title)}</h1>
{body}
</main></body></html>"""
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _notice(request: Request) -> str:
    text = request.query_params.get("notice")
    return f'<p class="notice" role="status">{_e(text)}</p>' if text else ""


def _bars(
    minutes: Sequence[repository.Minute], kind: str, *, width: int = 720, height: int = 90
) -> str:
    """One bar per minute of `kind` ("succeeded" or "failed"), oldest left."""
    values = [getattr(m, kind) for m in reversed(minutes)]
    top = max([*values, 1])
    step = width / max(1, len(values))
    bars = []
    for i, value in enumerate(values):
        h = value / top * (height - 14)
        ago = len(values) - 1 - i
        bars.append(
            f'<rect x="{i * step:.1f}" y="{height - h:.1f}" width="{step * 0.8:.1f}" '
            f'height="{h:.1f}"><title>{ago} min ago: {value} {kind}</title></rect>'
        )
    return (
        f'<svg class="chart {"ok" if kind == "succeeded" else "bad"}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{kind} per minute">'
        f'<text x="0" y="10" class="axis">{kind} per minute, max {top}</text>'
        f"{''.join(bars)}</svg>"
    )


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


def _filter_form(clean: Mapping[str, str]) -> str:
    options = "".join(
        f'<option value="{s.value}"{" selected" if clean.get("status") == s.value else ""}>'
        f"{s.value}</option>"
        for s in JobStatus
    )

    def box(name: str, label: str, size: int = 12) -> str:
        return (
            f'<label>{label} <input name="{name}" value="{_e(clean.get(name, ""))}" '
            f'size="{size}"></label>'
        )

    return f"""<form class="filters" method="get" action="/ui/jobs">
<label>State <select name="status"><option value="">any</option>{options}</select></label>
{box("type", "Type")}{box("org", "Org", 36)}{box("error_code", "Error code")}
{box("fingerprint", "Fingerprint")}
<button type="submit">Filter</button> <a href="/ui/jobs">Clear</a></form>"""


def _jobs_table(jobs: Sequence[JobRow], *, select: bool = False) -> str:
    def box(job_id: uuid.UUID) -> list[str]:
        return (
            [f'<input type="checkbox" name="id" value="{job_id}" form="selection" '
             f'aria-label="select {job_id}">']
            if select
            else []
        )  # fmt: skip

    return _table(
        [*([""] if select else []), "Job", "State", "Type", "Org", "Attempt", "Created", "Error"],
        [
            [
                *box(j.id), _job_link(j.id), _badge(j.status.value), _e(j.type), _org(j.org_id),
                f"{j.attempt}/{j.max_attempts}", f'<span title="{_when(j.created_at)}">'
                f"{_ago(j.created_at)}</span>", _e(j.last_error_code),
            ]
            for j in jobs
        ],
        "No jobs match.",
    )  # fmt: skip


# --- pages ----------------------------------------------------------------------------------


def _counts_cards(by_status: Mapping[str, int], org: uuid.UUID | None) -> str:
    cards = "".join(
        f'<a class="card s-{s}" href="{_url("/ui/jobs", status=s, org=org)}">'
        f'<span class="n">{by_status.get(s, 0)}</span><span>{s}</span></a>'
        for s in (x.value for x in JobStatus)
    )
    return f'<div class="cards" data-live id="counts">{cards}</div>'


def _failures_table(groups: Sequence[repository.FailureGroup], s: Session) -> str:
    rows = []
    for g in groups:
        retry = (
            f'<a class="button" href="{_url("/ui/bulk", action="retry", status="dead_letter", fingerprint=g.fingerprint)}">'  # noqa: E501
            "Retry this group</a>"
            if s.can_act
            else ""
        )
        show = _url("/ui/jobs", status="dead_letter", fingerprint=g.fingerprint)
        rows.append(
            [
                f'<a href="{show}">{g.jobs}</a>', _e(g.error_code),
                f'<span class="mono">{_e(g.fingerprint)}</span>', str(g.orgs),
                _e(", ".join(g.types)),
                _ago(g.last_failed_at), f'<span class="msg">{_e(g.sample_message)}</span>', retry,
            ]
        )  # fmt: skip
    return _table(
        ["Jobs", "Code", "Fingerprint", "Orgs", "Types", "Last", "Sample message", ""],
        rows,
        "No dead letters.",
    )


def _overview_body(conn: Connection, s: Session, org: uuid.UUID | None) -> str:
    st = ops.stats(conn, org_id=org, minutes=60)
    groups = ops.failures(conn, org_id=org, limit=10)
    succeeded = sum(m.succeeded for m in st.throughput)
    failed = sum(m.failed for m in st.throughput)
    oldest = (
        f"{_job_link(st.oldest_due.id)} ({_e(st.oldest_due.type)}), due "
        f"{st.oldest_due_seconds:.0f}s ago"
        if st.oldest_due
        else "none: nothing waits"
    )
    parts = [
        _counts_cards(st.by_status, org),
        f"""<section data-live id="throughput"><h2>Last hour</h2>
<p>{succeeded} succeeded, {failed} failed attempts; oldest due job: {oldest}</p>
<h3>Throughput: attempts succeeded per minute (oldest left)</h3>{_bars(st.throughput, "succeeded")}
<h3>Failures: attempts failed per minute</h3>{_bars(st.throughput, "failed")}
</section>""",
        f'<section data-live id="failures"><h2>Failures by fingerprint</h2>'
        f"{_failures_table(groups, s)}</section>",
    ]
    states = [x.value for x in JobStatus]
    if org is None:
        rows = [
            [_org(o), *[str(c.get(x, 0)) for x in states]]
            for o, c in sorted(st.by_org.items(), key=lambda kv: -kv[1].get("queued", 0))[:50]
        ]
        parts.append(
            '<section data-live id="orgs"><h2>Orgs</h2>'
            + _table(["Org", *states], rows, "No jobs.")
            + "</section>"
        )
    rows = [[_e(t), *[str(c.get(x, 0)) for x in states]] for t, c in sorted(st.by_type.items())]
    parts.append(
        f'<section data-live id="types"><h2>Types</h2>{_table(["Type", *states], rows, "No jobs.")}'
        "</section>"
    )
    return "\n".join(parts)


@router.get("")
def overview(request: Request, state: State, s: Operator) -> HTMLResponse:
    with _autocommit(state) as conn:
        body = _overview_body(conn, s, None)
    return _page("Overview", _notice(request) + body, s)


@router.get("/orgs/{org_id}")
def org_page(org_id: uuid.UUID, request: Request, state: State, s: Operator) -> HTMLResponse:
    with _autocommit(state) as conn:
        body = _overview_body(conn, s, org_id)
        recent = repository.list_jobs_ops(conn, JobFilter(org_id=org_id), limit=20)
    link = f'<p><a href="{_url("/ui/jobs", org=org_id)}">All jobs of this org</a></p>'
    recent_html = (
        f'<section data-live id="recent"><h2>Recent jobs</h2>{_jobs_table(recent)}</section>'
    )
    return _page(f"Org {org_id}", _notice(request) + link + body + recent_html, s)


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
    with _autocommit(state) as conn:
        rows = repository.list_jobs_ops(conn, f, limit=PAGE_SIZE + 1, before=before)
    page = rows[:PAGE_SIZE]
    pager = [f'<a href="{_url("/ui/jobs", **clean)}">First page</a>'] if before else []
    if len(rows) > PAGE_SIZE:
        next_cursor = _encode_cursor(page[-1].created_at, page[-1].id)
        pager.append(
            f'<a rel="next" href="{_url("/ui/jobs", **clean, cursor=next_cursor)}">Next page →</a>'
        )
    bulk = ""
    if s.can_act and clean:
        bulk = '<p class="bulk">For every job matching this filter: ' + " ".join(
            f'<a class="button" href="{_url("/ui/bulk", action=a.value, **clean)}">'
            f"{a.value.capitalize()}…</a>"
            for a in ops.Action
        ) + "</p>"  # fmt: skip
    selection = ""
    if s.can_act and page:
        selection = (
            '<form id="selection" method="get" action="/ui/bulk" class="act">With the selected '
            "jobs: " + " ".join(
                f'<button type="submit" name="action" value="{a.value}">'
                f"{a.value.capitalize()}…</button>"
                for a in ops.Action
            ) + "</form>"
        )  # fmt: skip
    errors = "".join(f'<p class="error">{_e(p)}</p>' for p in problems)
    body = (
        _notice(request) + errors + _filter_form(clean) + bulk
        + f'<section data-live id="jobs">{_jobs_table(page, select=s.can_act)}</section>'
        + selection + f'<p class="pager">{" ".join(pager)}</p>'
    )  # fmt: skip
    return _page("Jobs", body, s)


def _event_row(e: Any) -> str:
    d: dict[str, Any] = e.detail_json or {}
    extra = []
    if d.get("actor"):
        extra.append(f"by <b>{_e(d['actor'])}</b>")
    if d.get("reason"):
        extra.append(f"“{_e(d['reason'])}”")
    if d.get("error"):
        err = d["error"]
        extra.append(
            f'<span class="error-inline">{_e(err.get("code"))}: {_e(err.get("message"))}</span>'
        )
    if d.get("stage"):
        extra.append(f"stage {_e(d['stage'])}")
    if d.get("worker"):
        extra.append(f"worker {_e(d['worker'])}")
    prev = _badge(e.prev_status) if e.prev_status else "·"
    return (
        f'<li><time title="{_e(e.ts.isoformat())}">{_when(e.ts)}</time> {prev} → '
        f"{_badge(e.next_status)} <b>{_e(d.get('action', ''))}</b> {' '.join(extra)}</li>"
    )


def _actions(job: JobRow, s: Session) -> str:
    if not s.can_act:
        return '<p class="muted">Read-only: actions need the heimdex_admin role.</p>'
    forms = []
    for action in ops.Action:
        if job.status not in ops.TARGETS[action]:
            continue
        required = " required" if action is ops.Action.RETRY else ""
        forms.append(
            f"""<form method="post" action="/ui/jobs/{job.id}/{action.value}" class="act">
<input type="hidden" name="csrf" value="{s.csrf}">
<input name="reason" placeholder="reason{" (required)" if required else ""}" size="30"{required}>
<button type="submit" name="do" value="{action.value}">{action.value.capitalize()}</button>
</form>"""
        )
    return "".join(forms) or '<p class="muted">No action applies to this state.</p>'


@router.get("/jobs/{job_id}")
def job_page(job_id: uuid.UUID, request: Request, state: State, s: Operator) -> HTMLResponse:
    try:
        with _autocommit(state) as conn:
            job = repository.get_job(conn, job_id)
            events = repository.list_events(conn, job_id)
    except JobNotFound:
        return _page("Job not found", f"<p>No job {_e(job_id)}.</p>", s, status=404)
    fingerprint = (
        error_fingerprint(job.last_error_code, job.last_error_message)
        if job.last_error_code or job.last_error_message
        else None
    )
    error = (
        f"""<section class="errorbox"><h2>Last error</h2>
<p><b>{_e(job.last_error_code)}</b> {_e(job.last_error_message)}</p>
<p>Fingerprint <a class="mono" href="{_url("/ui/jobs", fingerprint=fingerprint)}">{fingerprint}</a></p>
</section>"""  # noqa: E501
        if fingerprint
        else ""
    )
    fields = [
        ("State", _badge(job.status.value) + (" (cancel requested)" * job.cancel_requested)),
        ("Type", _e(job.type)), ("Org", _org(job.org_id)),
        ("Attempt", f"{job.attempt} of {job.max_attempts} ({job.backoff_policy.value} backoff)"),
        ("Priority", str(job.priority)), ("Due", _when(job.run_at)),
        ("Stage", f"{_e(job.stage or '')} {job.progress}%"),
        ("Requested by", _e(job.requested_by)), ("Idempotency key", _e(job.idempotency_key)),
        ("Created", _when(job.created_at)), ("Started", _when(job.started_at)),
        ("Finished", _when(job.finished_at)), ("Worker", _e(job.leased_by)),
    ]  # fmt: skip
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in fields)
    timeline = "".join(_event_row(e) for e in events)
    body = f"""{_notice(request)}<p class="mono">{_e(job.id)}</p>
<div data-live id="job"><dl class="fields">{dl}</dl>{error}</div>
<section><h2>Actions</h2>{_actions(job, s)}</section>
<section><h2>Params</h2><pre>{_e(json.dumps(job.params, indent=2))}</pre>
<h2>Result</h2><pre>{_e(json.dumps(job.result, indent=2))}</pre></section>
<section data-live id="events"><h2>Events</h2><ol class="timeline">{timeline}</ol></section>"""
    return _page(f"Job {str(job.id)[:8]}", body, s)


@router.post("/jobs/{job_id}/{action}")
async def job_action(
    job_id: uuid.UUID, action: ops.Action, request: Request, state: State, s: Operator
) -> Response:
    form = await _form(request)
    _admin(s, form)

    def run() -> str:
        with state.engine.begin() as conn:
            job = ops.operate(
                conn, action, job_id, ops.Operator(s.principal.sub, form.get("reason"))
            )
        return f"{PAST[action.value]}: now {job.status.value}"

    try:
        notice = await run_in_threadpool(run)
    except HeimdexError as exc:
        notice = f"not done: {exc}"
    return RedirectResponse(_url(f"/ui/jobs/{job_id}", notice=notice), status_code=303)


@router.get("/failures")
def failures(request: Request, state: State, s: Operator) -> HTMLResponse:
    status = request.query_params.get("status", "dead_letter")
    statuses = [JobStatus.FAILED] if status == "failed" else [JobStatus.DEAD_LETTER]
    with _autocommit(state) as conn:
        groups = ops.failures(conn, statuses=statuses, limit=200)
    switch = (
        '<p>Showing <b>dead letters</b> · <a href="/ui/failures?status=failed">failed '
        "(not retryable)</a></p>"
        if statuses == [JobStatus.DEAD_LETTER]
        else '<p><a href="/ui/failures">Dead letters</a> · showing <b>failed</b></p>'
    )
    body = f'{_notice(request)}{switch}<section data-live id="groups">{_failures_table(groups, s)}</section>'  # noqa: E501
    return _page("Failures", body, s)


@router.get("/bulk")
def bulk_preview(request: Request, state: State, s: Operator) -> HTMLResponse:
    try:
        action = ops.Action(request.query_params.get("action", ""))
    except ValueError:
        return _page("Bulk action", '<p class="error">Unknown action.</p>', s, status=400)
    if not s.can_act:
        raise UiForbidden(f"bulk actions need the {ADMIN_ROLE} role (you have {s.principal.role})")
    f, clean, problems, selected = _filter_of(
        dict(request.query_params), request.query_params.getlist("id")
    )
    if problems:
        return _page(
            "Bulk action", f'<p class="error">{_e("; ".join(problems))}</p>', s, status=400
        )
    try:
        with _autocommit(state) as conn:
            count = ops.preview(conn, action, f)
    except HeimdexError as exc:
        return _page("Bulk action", f'<p class="error">{_e(exc)}</p>', s, status=400)
    described = ", ".join(
        [f"{k} = {_e(v)}" for k, v in clean.items()]
        + ([f"the job is one of the {len(selected)} selected"] if selected else [])
    )
    hidden = "".join(
        f'<input type="hidden" name="{k}" value="{_e(v)}">'
        for k, v in [*clean.items(), *(("id", i) for i in selected)]
    )
    required = " required" if action is ops.Action.RETRY else ""
    body = f"""<p>Jobs where {described}.</p>
<p class="preview" data-live id="preview"><b id="count">{count}</b> job{"" if count == 1 else "s"}
 will be {PAST[action.value]} (counted now; jobs that change meanwhile are checked again).</p>
<form method="post" action="/ui/bulk" class="act">
<input type="hidden" name="csrf" value="{s.csrf}"><input type="hidden" name="action" value="{action.value}">
{hidden}
<label>Reason <input name="reason" size="40"{required}></label>
<button type="submit">{action.value.capitalize()} {count} job{"" if count == 1 else "s"}</button>
<a href="{_url("/ui/jobs", **clean)}">Cancel</a></form>"""  # noqa: E501
    return _page(f"{action.value.capitalize()} jobs", body, s)


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


def _signin_page(message: str = "", status: int = 200, next_url: str = "/ui") -> HTMLResponse:
    error = f'<p class="error" role="alert">{_e(message)}</p>' if message else ""
    body = f"""{error}<form method="post" action="/ui/signin" class="signin">
<input type="hidden" name="next" value="{_e(next_url)}">
<label for="token">Bearer token with the <code>{ADMIN_ROLE}</code> or
<code>{READONLY_ROLE}</code> role</label>
<textarea id="token" name="token" rows="5" cols="70" required autocomplete="off"></textarea>
<button type="submit">Sign in</button></form>
<p class="muted">Locally: <code>heimdex dev-token --org "$(cat .heimdex/dev-org)" --role
{ADMIN_ROLE}</code>. The token is checked once; the browser then holds an 8-hour session.</p>"""
    return _page("Sign in", body, None, status=status)


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/ui") and not value.startswith("//"):
        return value
    return "/ui"


@router.get("/signin")
def signin_form(request: Request) -> HTMLResponse:
    return _signin_page(next_url=_safe_next(request.query_params.get("next")))


@router.post("/signin")
async def signin(request: Request, state: State) -> Response:
    form = await _form(request)
    next_url = _safe_next(form.get("next"))
    secret = state.settings.jwt_secret.get_secret_value()
    token = form.get("token", "").strip().removeprefix("Bearer ").strip()
    try:
        principal = decode_token(token, secret)
    except AuthenticationFailed as exc:
        return _signin_page(str(exc), 401, next_url)
    if not principal.is_operator:
        return _signin_page(
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
def signout() -> Response:
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
    body = f'<p class="error" role="alert">{_e(exc)}</p><p><a href="/ui">Back</a></p>'
    return _page("Forbidden", body, None, status=403)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.add_exception_handler(SignInRequired, _to_signin)
    app.add_exception_handler(UiForbidden, _forbidden)
