"""The dashboard's Pools page through the test client, over real ledger data: caps, weights, a
pause, running and finished jobs. Running against the caps, shares of the last hour against the
weights, the pauses with their resume buttons (admins only), and the oldest waiting job of each
queue and org with why it waits."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, text

from heimdex.ledger import control, pools, repository
from heimdex.ledger.repository import NewJob
from heimdex.ledger.repository import pools as pool_rows
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token
from tests.stack import SECRET

WHO = control.Who("op-carol", "GPU driver update")


def _submit(conn: Connection, org: uuid.UUID, n: int, queue: str = "default",
            type: str = "noop") -> list[uuid.UUID]:  # fmt: skip
    jobs = [
        NewJob(org_id=org, type=type, params={}, request_fingerprint=None, queue=queue)
        for _ in range(n)
    ]
    return [r.id for r in repository.insert_jobs(conn, jobs)]


def _sign_in(client: TestClient, role: str) -> str:
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op-alice", role=role)
    assert client.post("/ui/signin", data={"token": token}, follow_redirects=False).is_redirect
    found = re.search(r'name="csrf" value="(\w+)"', client.get("/ui").text)
    assert found
    return found.group(1)


def _row(page: str, cls: str, key: str, value: str) -> str:
    """The text of the first table row of `cls` whose `key` attribute is `value`."""
    found = re.search(rf'<tr class="{cls}" data-{key}="{re.escape(value)}">(.*?)</tr>', page, re.S)
    assert found, (cls, value)
    return html.unescape(re.sub(r"<[^>]+>", " ", found.group(1)))


@dataclass(frozen=True)
class Scene:
    heavy: uuid.UUID  # capped at 1 running, weight 3, a backlog held by its cap
    light: uuid.UUID  # no cap, weight 1, waits behind the running jobs
    gpu: uuid.UUID  # its queue is paused
    idle: uuid.UUID  # in a queue no worker claims from
    heavy_held: frozenset[uuid.UUID]
    gpu_job: uuid.UUID
    idle_job: uuid.UUID


@pytest.fixture
def scene(engine: Engine) -> Iterator[Scene]:
    heavy, light, gpu, idle = (uuid.uuid4() for _ in range(4))
    with engine.begin() as conn:
        control.set_limit(conn, WHO, org_id=heavy, max_running=1, weight=3)
        control.set_limit(conn, WHO, org_id=None, queue="default", max_running=10)
    with engine.begin() as conn:
        # An hour of history: the heavy org ran 30 of the window's minutes (clipped: it started
        # 90 minutes ago), the light one 10; a job finished two hours ago counts for nothing.
        done = _submit(conn, heavy, 2) + _submit(conn, light, 1)
        conn.execute(
            text("""
UPDATE job SET status = 'succeeded', turn = NULL,
       started_at = now() - CAST(:started AS interval),
       finished_at = now() - CAST(:ended AS interval)
 WHERE id = :id"""),
            [
                {"id": done[0], "started": "90 min", "ended": "30 min"},
                {"id": done[1], "started": "3 hours", "ended": "2 hours"},
                {"id": done[2], "started": "20 min", "ended": "10 min"},
            ],
        )
    with engine.begin() as conn:
        control.lock_placer(conn)
        control.reconcile(conn)
    with engine.begin() as conn:
        heavy_jobs = _submit(conn, heavy, 3)
        _submit(conn, light, 2)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while repository.place_due(conn):
            pass
        claimed = repository.claim(conn, worker_id="w1", limit=2, lease_seconds=600).jobs
    assert {j.org_id for j in claimed} == {heavy, light}
    held = frozenset(heavy_jobs) - {j.id for j in claimed}
    with engine.begin() as conn:
        control.pause(conn, WHO, kind="queue", value="gpu")
    with engine.begin() as conn:
        (gpu_job,) = _submit(conn, gpu, 1, queue="gpu")
        (idle_job,) = _submit(conn, idle, 1, queue="batch")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while repository.place_due(conn):
            pass
    yield Scene(heavy, light, gpu, idle, held, gpu_job, idle_job)


def test_nothing_is_shown_or_changed_without_a_session(client: TestClient, engine: Engine) -> None:
    with engine.begin() as conn:
        control.pause(conn, WHO, kind="queue", value="gpu")
    page = client.get("/ui/pools", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/ui/signin?next=")
    forged = client.post("/ui/pools/resume", data={"kind": "queue", "value": "gpu", "reason": "x"})
    assert forged.status_code == 401
    with engine.connect() as conn:
        assert [(p.kind, p.value) for p in control.list_pauses(conn)] == [("queue", "gpu")]


def test_the_pools_page_shows_caps_shares_pauses_and_why_jobs_wait(
    client: TestClient, scene: Scene
) -> None:
    _sign_in(client, READONLY_ROLE)
    resp = client.get("/ui/pools")
    assert resp.status_code == 200, resp.text
    page = resp.text
    assert 'href="/ui/pools"' in page  # in the nav

    default = _row(page, "pool", "queue", "default")
    assert "2 / 10" in default  # two running of the queue's cap of ten
    heavy = _row(page, "org-in-queue", "org", str(scene.heavy))
    light = _row(page, "org-in-queue", "org", str(scene.light))
    # 30 of the hour's 40 minutes of running time, and weight 3 against 1: 75 % each way.
    assert re.search(r"75% .*75% .*weight 3", heavy, re.S), heavy
    assert re.search(r"25% .*25% .*weight 1", light, re.S), light

    # Running against the org's cap, the oldest waiting job of each org and why it waits.
    heavy_org = _row(page, "org", "org", str(scene.heavy))
    assert re.search(r"1 / 1 .*full", heavy_org, re.S), heavy_org
    assert "at its org's cap: 1 of 1 slots taken" in heavy_org
    assert any(str(i)[:8] in heavy_org for i in scene.heavy_held), heavy_org
    assert "behind others: 2 running" in _row(page, "org", "org", str(scene.light))
    gpu = _row(page, "org", "org", str(scene.gpu))
    assert "queue gpu is paused by op-carol: GPU driver update" in gpu
    assert str(scene.gpu_job)[:8] in gpu
    idle = _row(page, "pool", "queue", "batch")
    assert "no worker for queue batch" in idle and str(scene.idle_job)[:8] in idle
    assert "paused" in _row(page, "pool", "queue", "gpu")

    # The pause, with who and why; a read-only operator has no button and is refused.
    pause = _row(page, "pause", "kind", "queue")
    assert "gpu" in pause and "op-carol" in pause and "GPU driver update" in pause
    assert 'action="/ui/pools/resume"' not in page and 'action="/ui/pools/pause"' not in page
    csrf = re.search(r'name="csrf" value="(\w+)"', page).group(1)  # type: ignore[union-attr]
    refused = client.post(
        "/ui/pools/resume", data={"csrf": csrf, "kind": "queue", "value": "gpu", "reason": "x"}
    )
    assert refused.status_code == 403
    assert "paused by op-carol" in client.get("/ui/pools").text


def test_an_admin_pauses_and_resumes_from_the_page(
    client: TestClient, engine: Engine, scene: Scene
) -> None:
    csrf = _sign_in(client, ADMIN_ROLE)
    page = client.get("/ui/pools").text
    assert 'action="/ui/pools/resume"' in page and 'action="/ui/pools/pause"' in page

    # Without a reason, or without the form token: refused, nothing changes.
    stale = client.post(
        "/ui/pools/resume", data={"csrf": "x", "kind": "queue", "value": "gpu", "reason": "ok"}
    )
    assert stale.status_code == 403
    blank = client.post(
        "/ui/pools/resume", data={"csrf": csrf, "kind": "queue", "value": "gpu", "reason": " "}
    )
    assert blank.status_code == 200 and "Not done: a reason is needed" in blank.text
    bad = client.post(
        "/ui/pools/pause", data={"csrf": csrf, "kind": "org", "value": "acme", "reason": "x"}
    )
    assert "Not done: org &#39;acme&#39; is not a UUID" in bad.text
    with engine.connect() as conn:
        assert [(p.kind, p.value) for p in control.list_pauses(conn)] == [("queue", "gpu")]

    resumed = client.post(
        "/ui/pools/resume",
        data={"csrf": csrf, "kind": "queue", "value": "gpu", "reason": "driver fixed"},
    )
    assert resumed.status_code == 200 and "Resumed queue gpu." in resumed.text
    assert 'data-kind="queue"' not in resumed.text
    paused = client.post(
        "/ui/pools/pause",
        data={"csrf": csrf, "kind": "org", "value": str(scene.light), "reason": "abuse"},
    )
    assert "Paused org" in paused.text and "1 queued jobs held" in paused.text
    light = _row(paused.text, "org", "org", str(scene.light))
    assert f"org {scene.light} is paused by op-alice: abuse" in light
    with engine.connect() as conn:
        assert [(p.kind, p.actor) for p in control.list_pauses(conn)] == [("org", "op-alice")]
        events = [(e["action"], e["actor"], e["reason"]) for e in control.list_events(conn)]
    assert events[:2] == [("paused", "op-alice", "abuse"), ("resumed", "op-alice", "driver fixed")]


def test_the_view_reads_the_window_and_cuts_it_when_bounded(
    engine: Engine, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pools, "ORGS_SHOWN", 1)  # the busiest only, and how many are left out
    with engine.connect() as conn:
        full = pools.view(conn)
    assert [o.org_id for o in full.orgs] == [scene.heavy] and full.more_orgs == 3
    (default,) = [p for p in full.pools if p.queue == "default"]
    assert [c.org_id for c in default.orgs] == [scene.heavy] and default.more_orgs == 1
    with engine.connect() as conn:
        cut = pool_rows.running_time(conn, rows=1)
    assert not full.cut and (full.until - full.since).total_seconds() == 3600
    # Read one finished job per state at most: the window starts at the newest one read.
    assert cut.cut and abs((cut.until - cut.since).total_seconds() - 600) < 5
    seconds = {r.org_id: r.seconds for r in cut.rows}
    assert seconds[scene.light] < 60 and seconds[scene.heavy] < 60  # their running jobs only
