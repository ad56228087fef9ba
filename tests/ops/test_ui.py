"""The dashboard's server side through the test client: sign-in, the session cookie, role
checks, pages and forms. The browser test (test_browser.py) drives it for real."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Mapping
from urllib.parse import urlencode

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from heimdex.ledger import repository
from heimdex.models import JobStatus
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token
from tests.ops import seed
from tests.stack import SECRET

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _token(role: str, sub: str = "op-alice") -> str:
    return issue_token(SECRET, org_id=uuid.uuid4(), sub=sub, role=role)


def _sign_in(client: TestClient, role: str) -> str:
    resp = client.post("/ui/signin", data={"token": _token(role)}, follow_redirects=False)
    assert resp.status_code == 303, resp.text
    cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    return re.search(r'name="csrf" value="(\w+)"', client.get("/ui").text).group(1)  # type: ignore[union-attr]


def test_nothing_is_shown_without_a_session(client: TestClient) -> None:
    for path in ("/ui", "/ui/jobs", "/ui/failures", f"/ui/jobs/{uuid.uuid4()}", "/ui/bulk"):
        resp = client.get(path, follow_redirects=False)
        assert resp.status_code == 303, path
        assert resp.headers["location"].startswith("/ui/signin?next=")
    page = client.get("/ui/signin")
    assert page.status_code == 200 and "<textarea" in page.text
    assert client.get("/ui/static/ui.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/static/../app.py").status_code == 404
    forged = client.post("/ui/bulk", data={"action": "retry", "type": "noop"})
    assert forged.status_code == 401


def test_a_token_without_an_operator_role_is_refused(client: TestClient) -> None:
    resp = client.post("/ui/signin", data={"token": _token("authenticated")})
    assert resp.status_code == 403 and "no operator role" in resp.text
    assert "set-cookie" not in resp.headers
    bad = client.post("/ui/signin", data={"token": "nonsense"})
    assert bad.status_code == 401 and "invalid" in bad.text
    client.cookies.set("heimdex_session", _token(ADMIN_ROLE), path="/ui")  # a bearer is no session
    assert client.get("/ui", follow_redirects=False).status_code == 303


def test_pages_render_for_a_readonly_operator_without_actions(
    client: TestClient, engine: Engine
) -> None:
    org = uuid.uuid4()
    (job_id,) = seed.failed(engine, org)
    _sign_in(client, READONLY_ROLE)
    overview = client.get("/ui").text
    assert "UPSTREAM_TIMEOUT" in overview and "<svg" in overview and str(org)[:8] in overview
    assert "Retry this group" not in overview
    assert str(job_id)[:8] in client.get("/ui/jobs", params={"status": "dead_letter"}).text
    detail = client.get(f"/ui/jobs/{job_id}").text
    assert "attempt_failed" in detail and "Read-only" in detail and 'action="/ui/jobs' not in detail
    assert str(job_id)[:8] in client.get(f"/ui/orgs/{org}").text
    assert client.get("/ui/bulk", params={"action": "retry", "type": "noop"}).status_code == 403


def test_admin_retries_a_group_after_a_count_preview(client: TestClient, engine: Engine) -> None:
    org = uuid.uuid4()
    ids = seed.failed(engine, org, 3)
    csrf = _sign_in(client, ADMIN_ROLE)
    failures = client.get("/ui/failures").text
    (href,) = re.findall(r'href="(/ui/bulk\?[^"]+)"', failures)
    preview = client.get(href.replace("&amp;", "&")).text
    assert '<b id="count">3</b>' in preview and "will be retried" in preview
    fp = re.search(r'name="fingerprint" value="(\w+)"', preview).group(1)  # type: ignore[union-attr]
    form = {"action": "retry", "status": "dead_letter", "fingerprint": fp, "reason": "fixed"}
    stale = client.post("/ui/bulk", data={**form, "csrf": "0" * 32})
    assert stale.status_code == 403
    done = client.post("/ui/bulk", data={**form, "csrf": csrf})
    assert done.status_code == 200 and "Retried 3 jobs in 1 batches." in done.text
    with engine.connect() as conn:
        for job_id in ids:
            assert repository.get_job(conn, job_id).status is JobStatus.QUEUED
            detail = repository.list_events(conn, job_id)[-1].detail_json
            assert (detail["actor"], detail["reason"]) == ("op-alice", "fixed")


def test_admin_acts_on_one_job_and_sees_refusals(client: TestClient, engine: Engine) -> None:
    (job_id,) = seed.failed(engine, uuid.uuid4())
    csrf = _sign_in(client, ADMIN_ROLE)
    no_reason = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf": csrf, "reason": ""})
    assert "not done: a retry needs a reason" in no_reason.text
    done = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf": csrf, "reason": "ok"})
    assert "retried: now queued" in done.text and "retried</b> by <b>op-alice" in done.text
    cancel = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf})
    assert "canceled: now canceled" in cancel.text
    client.post("/ui/signout", data={"csrf": csrf})
    assert client.get("/ui", follow_redirects=False).status_code == 303


def test_admin_cancels_a_selection(client: TestClient, engine: Engine) -> None:
    a, b, c = seed.queued(engine, uuid.uuid4(), 3)
    csrf = _sign_in(client, ADMIN_ROLE)
    listing = client.get("/ui/jobs", params={"status": "queued"}).text
    assert listing.count('type="checkbox" name="id"') == 3 and 'id="selection"' in listing
    preview = client.get(
        "/ui/bulk", params=[("action", "cancel"), ("id", str(a)), ("id", str(b))]
    ).text
    assert '<b id="count">2</b>' in preview and "one of the 2 selected" in preview
    form = [("csrf", csrf), ("action", "cancel"), ("id", str(a)), ("id", str(b))]
    done = client.post("/ui/bulk", content=urlencode(form), headers=FORM)
    assert "Canceled 2 jobs in 1 batches." in done.text
    with engine.connect() as conn:
        states = [repository.get_job(conn, j).status for j in (a, b, c)]
    assert states == [JobStatus.CANCELED, JobStatus.CANCELED, JobStatus.QUEUED]
    bad = client.get("/ui/bulk", params=[("action", "cancel"), ("id", "nope")])
    assert bad.status_code == 400 and "'nope' is not a job id" in html.unescape(bad.text)


def test_signing_out_needs_the_form_token(client: TestClient) -> None:
    csrf = _sign_in(client, READONLY_ROLE)
    for forged in ({}, {"csrf": ""}, {"csrf": "0" * 32}, {"csrf": "é" * 32}):
        refused = client.post("/ui/signout", data=forged, follow_redirects=False)
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
        assert client.get("/ui", follow_redirects=False).status_code == 200
    done = client.post("/ui/signout", data={"csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/ui/signin"
    assert client.get("/ui", follow_redirects=False).status_code == 303


CSP = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self'",
    "connect-src": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "object-src": "'none'",
}


def _assert_guarded(headers: Mapping[str, str], where: object) -> None:
    policy = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    assert policy == CSP, where
    assert headers["x-frame-options"] == "DENY", where
    assert headers["x-content-type-options"] == "nosniff", where
    assert headers["referrer-policy"] == "same-origin", where


def test_every_dashboard_response_carries_the_browser_guards(
    client: TestClient, engine: Engine
) -> None:
    (job_id,) = seed.failed(engine, uuid.uuid4())
    anonymous = [
        client.get("/ui", follow_redirects=False),
        client.get("/ui/signin"),
        client.post("/ui/signin", data={"token": "nonsense"}),
        client.get("/ui/static/ui.js"),
        client.get("/ui/static/ui.css"),
        client.get("/ui/static/nothing.js"),
        client.get("/ui/no-such-page"),
    ]
    csrf = _sign_in(client, ADMIN_ROLE)
    signed_in = [
        client.get(path)
        for path in ("/ui", "/ui/jobs", "/ui/failures", f"/ui/jobs/{job_id}", "/ui/bulk")
    ] + [
        client.get("/ui/bulk", params={"action": "retry", "type": "noop"}),
        client.post(
            f"/ui/jobs/{job_id}/retry", data={"csrf": csrf, "reason": "x"}, follow_redirects=False
        ),
        client.post("/ui/bulk", data={"csrf": "stale"}),
        client.post("/ui/signout", data={"csrf": csrf}, follow_redirects=False),
    ]
    for resp in anonymous + signed_in:
        _assert_guarded(resp.headers, resp.url)
    # The API's own routes are not pages and keep their headers.
    assert "content-security-policy" not in client.get("/healthz").headers
