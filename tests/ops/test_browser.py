"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) against a
real API server and, once the group is retried, a real worker. Screenshots go to the test's
tmp dir (printed); HEIMDEX_DOCS_SCREENSHOT=1 also refreshes docs/img/dashboard.png. Every
page is watched for dialogs and Content-Security-Policy violations."""

from __future__ import annotations

import os
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, expect, sync_playwright
from sqlalchemy import Engine

from heimdex.ledger import control
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token
from heimdex_db.localpg import free_port
from tests.ops import seed
from tests.ops.seed import HOSTILE
from tests.ops.test_ui_hostile import hostile_pages
from tests.stack import SECRET, Processes, wait_for

pytestmark = pytest.mark.slow  # a browser, the API and a worker as processes

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "img" / "dashboard.png"


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/install-deps.sh installs Debian's chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def api_url(processes: Processes) -> str:
    port = free_port()
    api = processes.start("api", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert api.poll() is None, processes.log_of(api)
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):  # noqa: S310 - loopback
                return True
        except OSError:
            return False

    wait_for(up, what="the API server", timeout=60)
    return url


@dataclass
class Watch:
    """What a page did that no page of ours should: open a dialog, break its CSP."""

    dialogs: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)

    def on(self, page: Page) -> Page:
        def dialog(d: Dialog) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        def console(m: ConsoleMessage) -> None:
            if "Content Security Policy" in m.text:
                self.csp.append(m.text)

        page.on("dialog", dialog)
        page.on("console", console)
        return page


def _token(role: str, sub: str) -> str:
    return issue_token(SECRET, org_id=uuid.uuid4(), sub=sub, role=role)


def _sign_in(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/ui")
    expect(page).to_have_url(f"{url}/ui/signin?next=%2Fui")
    page.fill("#token", token)
    page.click("button[type=submit]")


def test_an_operator_retries_a_dead_letter_group_and_a_worker_runs_it(
    browser: Browser, api_url: str, engine: Engine, processes: Processes, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots: {shots}")  # noqa: T201 - where the artifacts are
    org, other = uuid.uuid4(), uuid.uuid4()
    timeouts = seed.failed(engine, org, 3)
    seed.failed(engine, other, 1, code="BAD_INPUT", message="row 1 is empty")
    seed.queued(engine, other, 2)

    watch = Watch()
    page = watch.on(browser.new_page(viewport={"width": 1280, "height": 900}))
    # Refused without the role: the sign-in page says why and nothing else is shown.
    _sign_in(page, api_url, _token("authenticated", "tenant-user"))
    expect(page.locator(".error")).to_contain_text("no operator role")
    page.screenshot(path=shots / "01-refused.png")
    page.goto(f"{api_url}/ui/jobs")
    expect(page).to_have_url(f"{api_url}/ui/signin?next=%2Fui%2Fjobs")

    _sign_in(page, api_url, _token(ADMIN_ROLE, "op-alice"))
    expect(page).to_have_url(f"{api_url}/ui")
    expect(page.locator(".card.s-dead_letter .n")).to_have_text("4")
    expect(page.locator("#failures tbody tr")).to_have_count(2)
    page.screenshot(path=shots / "02-overview.png", full_page=True)

    # Filter the job list, then open a job and read its timeline.
    page.click("nav >> text=Jobs")
    page.select_option("select[name=status]", "dead_letter")
    page.fill("input[name=error_code]", "UPSTREAM_TIMEOUT")
    page.click("form.filters button[type=submit]")
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(3)
    page.screenshot(path=shots / "03-filtered.png", full_page=True)
    rows.first.locator("a.mono").first.click()
    expect(page.locator(".errorbox")).to_contain_text("UPSTREAM_TIMEOUT")
    expect(page.locator("#events li")).to_have_count(3)
    expect(page.locator("#events")).to_contain_text("attempt_failed")
    page.screenshot(path=shots / "04-job.png", full_page=True)

    # Cancel a selection: the two queued jobs, checked in the list.
    page.click("nav >> text=Jobs")
    page.select_option("select[name=status]", "queued")
    page.click("form.filters button[type=submit]")
    expect(rows).to_have_count(2)
    for box in page.locator("#jobs input[type=checkbox]").all():
        box.check()
    page.click("#selection button[value=cancel]")
    expect(page.locator("#count")).to_have_text("2")
    page.click("form.act button[type=submit]")
    expect(page.locator(".notice")).to_have_text("Canceled 2 jobs in 1 batches.")

    # Retry the group: a count first, a reason required.
    page.click("nav >> text=Failures")
    group = page.locator("tr", has_text="UPSTREAM_TIMEOUT")
    group.locator("text=Retry this group").click()
    expect(page.locator("#count")).to_have_text("3")
    page.click("form.act button[type=submit]")  # no reason: the browser refuses to send it
    expect(page.locator("#count")).to_have_text("3")
    page.fill("input[name=reason]", "upstream fixed")
    page.screenshot(path=shots / "05-preview.png", full_page=True)
    page.click("form.act button[type=submit]")
    expect(page.locator(".notice")).to_have_text("Retried 3 jobs in 1 batches.")
    expect(page.locator("#jobs .badge.s-queued")).to_have_count(3)
    page.screenshot(path=shots / "06-queued.png", full_page=True)

    # A real worker runs them; the page shows it by polling, without a reload.
    processes.start("worker")
    expect(page.locator("#jobs .badge.s-succeeded")).to_have_count(3, timeout=60_000)
    page.screenshot(path=shots / "07-succeeded.png", full_page=True)
    page.goto(f"{api_url}/ui/jobs/{timeouts[0]}")
    expect(page.locator("#events")).to_contain_text("by op-alice “upstream fixed”")

    page.goto(f"{api_url}/ui")
    expect(page.locator(".card.s-succeeded .n")).to_have_text("3")
    expect(page.locator(".card.s-canceled .n")).to_have_text("2")
    page.screenshot(path=shots / "dashboard.png", full_page=True)
    if os.environ.get("HEIMDEX_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shots / "dashboard.png", DOCS_SCREENSHOT)

    # Read-only: everything visible, nothing to press.
    viewer = watch.on(browser.new_page())
    _sign_in(viewer, api_url, _token(READONLY_ROLE, "op-bob"))
    expect(viewer.locator(".who")).to_contain_text("read-only")
    viewer.goto(f"{api_url}/ui/failures")
    expect(viewer.locator("#groups tbody tr")).to_have_count(1)
    expect(viewer.locator("text=Retry this group")).to_have_count(0)
    viewer.screenshot(path=shots / "08-readonly.png", full_page=True)
    assert watch == Watch(), "the pages broke their Content-Security-Policy"


def test_an_operator_sees_a_paused_queue_on_the_pools_page_and_resumes_it(
    browser: Browser, api_url: str, engine: Engine
) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        control.pause(conn, control.Who("op-carol", "driver update"), kind="queue", value="gpu")
    seed.queued(engine, org, 2)
    watch = Watch()
    page = watch.on(browser.new_page(viewport={"width": 1280, "height": 900}))
    _sign_in(page, api_url, _token(ADMIN_ROLE, "op-alice"))
    page.click("nav >> text=Pools")
    expect(page).to_have_url(f"{api_url}/ui/pools")
    paused = page.locator("#paused tr.pause")
    expect(paused).to_have_count(1)
    expect(paused).to_contain_text("gpu")
    expect(paused).to_contain_text("driver update")
    expect(page.locator('#pools tr.pool[data-queue="gpu"]')).to_contain_text("paused")
    expect(page.locator('#pools tr.pool[data-queue="default"]')).to_contain_text("2")
    paused.locator("button", has_text="Resume").click()  # no reason: the browser refuses
    expect(paused).to_have_count(1)
    paused.locator("input[name=reason]").fill("driver fixed")
    paused.locator("button", has_text="Resume").click()
    expect(page.locator(".notice")).to_have_text("Resumed queue gpu.")
    expect(page.locator("#paused tr.pause")).to_have_count(0)
    expect(page.locator("#paused")).to_contain_text("Nothing is paused.")
    with engine.connect() as conn:
        assert control.list_pauses(conn) == []
        assert control.list_events(conn, limit=1)[0]["reason"] == "driver fixed"
    assert watch == Watch(), "the Pools page broke its Content-Security-Policy"


def test_hostile_job_data_stays_inert_in_the_browser(
    browser: Browser, api_url: str, engine: Engine
) -> None:
    org = uuid.uuid4()
    ids = seed.hostile(engine, org)
    watch = Watch()
    page = watch.on(browser.new_page())
    _sign_in(page, api_url, issue_token(SECRET, org_id=org, sub=HOSTILE, role=ADMIN_ROLE))
    expect(page.locator(".who")).to_contain_text(HOSTILE)
    page.goto(f"{api_url}/ui/jobs/{ids['queued']}")
    page.fill("input[name=reason]", HOSTILE)
    page.click("button[value=cancel]")
    expect(page.locator("#events")).to_contain_text(f"by {HOSTILE} “{HOSTILE}”")
    for path in hostile_pages(ids, org):
        page.goto(f"{api_url}{path}")
        expect(page.locator("h1")).to_be_visible()
        assert watch == Watch(), f"{path} ran markup from job data"
        # The markup is on the page as text, not as elements.
        assert page.locator("main img, main script, [onerror]").count() == 0, path
