"""Every dashboard page rendered over job data that carries markup (type, params, error code
and message, stage, worker, idempotency key, requester, operator name, reason, query string):
the markup arrives as text, never as elements or attributes. test_browser.py loads the same
pages in a real browser and watches for a dialog."""

from __future__ import annotations

import html
import json
import re
import uuid
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token
from heimdex_api.ui import templates
from tests.ops import seed
from tests.ops.seed import HOSTILE, IMG, SCRIPT
from tests.stack import SECRET

OWN_SCRIPT = "/ui/static/ui.js"


class Markup(HTMLParser):
    """The elements and attributes of a page, and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict[str, str | None]] = []
        self.foreign: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        if tag in ("img", "iframe", "object", "embed", "base"):
            self.foreign.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.foreign.append(f"<{tag} {name}=...>")
            if (value or "").strip().lower().startswith("javascript:"):
                self.foreign.append(f"<{tag} {name}={value}>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_inert(html: str) -> str:
    """The page's text, once it is known to hold no markup of the data's making."""
    page = Markup()
    page.feed(html)
    page.close()
    assert page.scripts == [{"src": OWN_SCRIPT, "defer": None}], page.scripts
    assert page.foreign == []
    return "".join(page.text)


def hostile_pages(ids: dict[str, uuid.UUID], org: uuid.UUID) -> list[str]:
    """Every page, with the hostile data in view and the hostile strings in the query."""
    return [
        "/ui",
        f"/ui?notice={HOSTILE}",
        "/ui/jobs",
        f"/ui/jobs?type={HOSTILE}&error_code={HOSTILE}&fingerprint={HOSTILE}",
        f"/ui/jobs?status={HOSTILE}&org={HOSTILE}&cursor={HOSTILE}",
        *(f"/ui/jobs/{i}" for i in ids.values()),
        f"/ui/jobs/{ids['dead']}?notice={HOSTILE}",
        f"/ui/orgs/{org}",
        "/ui/failures",
        "/ui/failures?status=failed",
        "/ui/pools",
        f"/ui/pools?notice={HOSTILE}",
        f"/ui/bulk?action=retry&type={HOSTILE}&error_code={HOSTILE}",
        f"/ui/bulk?action=cancel&id={HOSTILE}",
        f"/ui/bulk?action={HOSTILE}",
        f"/ui/signin?next=/ui{HOSTILE}",
    ]


@pytest.fixture
def hostile_jobs(engine: Engine) -> tuple[dict[str, uuid.UUID], uuid.UUID]:
    org = uuid.uuid4()
    return seed.hostile(engine, org), org


def test_hostile_job_data_renders_as_text_on_every_page(
    client: TestClient, hostile_jobs: tuple[dict[str, uuid.UUID], uuid.UUID]
) -> None:
    ids, org = hostile_jobs
    token = issue_token(SECRET, org_id=org, sub=HOSTILE, role=ADMIN_ROLE)
    assert client.post("/ui/signin", data={"token": token}, follow_redirects=False).is_redirect
    csrf = re.search(r'name="csrf" value="(\w+)"', client.get("/ui").text).group(1)  # type: ignore[union-attr]
    acted = client.post(f"/ui/jobs/{ids['queued']}/cancel", data={"csrf": csrf, "reason": HOSTILE})
    assert acted.status_code == 200

    texts = {}
    for path in hostile_pages(ids, org):
        resp = client.get(path)
        assert resp.status_code in (200, 400), (path, resp.status_code)
        texts[path] = assert_inert(resp.text)
    # The data did reach the pages, as text.
    dead = texts[f"/ui/jobs/{ids['dead']}"]
    for shown in (f"{HOSTILE}: {HOSTILE}", f'"note": {json.dumps(HOSTILE)}', f"{HOSTILE}0", IMG):
        assert shown in dead, shown
    assert f"by {HOSTILE} “{HOSTILE}”" in texts[f"/ui/jobs/{ids['queued']}"]
    assert f"worker {HOSTILE}" in texts[f"/ui/jobs/{ids['running']}"]
    assert HOSTILE in texts["/ui"] and HOSTILE in texts["/ui/failures"]
    assert "is not a job id" in texts[f"/ui/bulk?action=cancel&id={HOSTILE}"]
    pools = texts["/ui/pools"]
    assert pools.count(HOSTILE) >= 3  # the paused type, its actor, the reason
    assert f"no worker for queue {SCRIPT}'\"" in pools  # the queue's name
    assert HOSTILE in texts[f"/ui/pools?notice={HOSTILE}"]
    # The hostile type's pause is resumed through its own button's hidden fields.
    form = re.search(r'action="/ui/pools/resume".*?</form>', client.get("/ui/pools").text, re.S)
    assert form
    fields = {
        k: html.unescape(v) for k, v in re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0))
    }
    resumed = client.post("/ui/pools/resume", data={**fields, "reason": HOSTILE})
    assert f"Resumed type {HOSTILE}." in assert_inert(resumed.text)

    readonly = issue_token(SECRET, org_id=org, sub=HOSTILE, role=READONLY_ROLE)
    client.post("/ui/signin", data={"token": readonly})
    forbidden = client.get(f"/ui/bulk?action=retry&type={HOSTILE}")
    assert forbidden.status_code == 403
    assert_inert(forbidden.text)
    refused = client.post("/ui/signin", data={"token": HOSTILE, "next": f"/ui{HOSTILE}"})
    assert refused.status_code == 401
    assert_inert(refused.text)


def test_a_token_whose_sub_is_not_unicode_is_refused(client: TestClient) -> None:
    # A JSON string may spell a lone surrogate; no page, and no database row, can hold one.
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op-\ud800", role=ADMIN_ROLE)
    signin = client.post("/ui/signin", data={"token": token}, follow_redirects=False)
    assert signin.status_code == 401 and "set-cookie" not in signin.headers
    assert "sub claim" in signin.text
    assert_inert(signin.text)
    api = client.get(f"/jobs/{uuid.uuid4()}", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 401 and "sub claim" in api.json()["detail"]


def test_every_template_escapes_and_runs_under_the_policy() -> None:
    env = templates().env
    names = env.list_templates()
    assert "base.html" in names and any(n.startswith("partials/") for n in names)
    assert env.autoescape is True
    forbidden = {
        "data marked safe": r"\|\s*safe\b|autoescape\s+false|Markup",
        "an inline script": r"<script(?![^>]*\ssrc=)",
        "an inline handler": r"<[^>]*\son[a-z]+\s*=",
        "an inline style": r"<[^>]*\sstyle\s*=|<style",
    }
    for name in names:
        source = env.loader.get_source(env, name)[0]  # type: ignore[union-attr]
        for what, pattern in forbidden.items():
            assert not re.search(pattern, source), f"{name} has {what}"
        env.get_template(name)  # it compiles
