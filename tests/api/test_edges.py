"""The API's edges: bad input, oversized or unauthenticated bodies and a database outage are
answered as problem details (4xx or 503), never a 500."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import jwt
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy.engine import URL

from heimdex_api.app import BODY_MAX_BYTES
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres, free_port
from tests.stack import FAST, SECRET, Processes, auth, wait_for

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


def _token(**claims: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@pytest.mark.parametrize("sub", ["a\x00b", "a\ud800b", "x" * 256, "", 42])
def test_a_bad_sub_claim_is_a_401(client: TestClient, org_id: uuid.UUID, sub: object) -> None:
    resp = client.get("/jobs", headers=_token(sub=sub, org_id=str(org_id)))
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"] == PROBLEM


def test_a_255_character_sub_is_accepted(client: TestClient, org_id: uuid.UUID) -> None:
    resp = client.post("/jobs", json={"type": "noop"}, headers=auth(org_id, sub="x" * 255))
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(
    "body",
    [
        {"type": "no\x00op"},
        {"type": "noop", "params": {"a\x00": 1}},
        {"type": "mock_process", "params": {"stage_seconds": 0.01, "x": ["\x00"]}},
    ],
)
def test_a_nul_in_the_body_is_a_422(
    client: TestClient, org_id: uuid.UUID, body: dict[str, object]
) -> None:
    resp = client.post("/jobs", json=body, headers=auth(org_id))
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == PROBLEM


def test_405_carries_allow(client: TestClient, org_id: uuid.UUID) -> None:
    resp = client.delete(f"/jobs/{uuid.uuid4()}/cancel", headers=auth(org_id))
    assert resp.status_code == 405
    assert resp.headers["content-type"] == PROBLEM
    assert resp.headers["allow"] == "POST"
    # A path two routes share lists the methods of both.
    both = client.delete("/jobs", headers=auth(org_id))
    assert both.status_code == 405
    assert both.headers["allow"] == "GET, POST"


# A real API process, so the body really streams over a socket; one for the module (its tests
# are refused before anything is written).


@pytest.fixture(scope="module")
def api_port(module_processes: Processes) -> int:
    port = free_port()
    module_processes.start("api", "--port", str(port))
    wait_for(lambda: _status(port, "GET", "/healthz") == 200, what="the API")
    return port


def _status(port: int, method: str, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


CHUNK = b"[" + b" " * (64 * 1024 - 2) + b"]"


def _chunked(port: int, headers: dict[str, str], total: int, *, finish: bool = False) -> int:
    """Start a chunked POST of `total` bytes and read the answer WITHOUT sending the rest of
    the body (nor, unless `finish`, its end): an answer can only come from a server that did
    not wait for the whole body. The status, or a timeout error if the server waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{head}\r\n".encode()
    )
    sent = 0
    with contextlib.suppress(OSError):  # the server may answer and close mid-body
        while sent < total:
            sock.sendall(f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n")
            sent += len(CHUNK)
        if finish:
            sock.sendall(b"0\r\n\r\n")
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    status = resp.status
    resp.read()
    sock.close()
    return status


@pytest.mark.xdist_group("edges_api")
@pytest.mark.slow
def test_an_unauthenticated_chunked_body_is_refused_before_it_is_read(api_port: int) -> None:
    # 5 MB announced by chunking, one 64 KiB chunk sent: the 401 comes without the rest.
    assert _chunked(api_port, {}, len(CHUNK)) == 401


@pytest.mark.xdist_group("edges_api")
@pytest.mark.slow
def test_an_oversized_chunked_body_is_refused_while_it_streams(
    api_port: int, org_id: uuid.UUID
) -> None:
    # Past the limit and still streaming (no final chunk): the 413 comes without the rest.
    assert _chunked(api_port, auth(org_id), BODY_MAX_BYTES + len(CHUNK)) == 413
    assert _chunked(api_port, auth(org_id), 5 * 1024 * 1024) == 413
    # Just under the limit, complete: it reaches validation (a JSON array, not a job: 422).
    assert _chunked(api_port, auth(org_id), BODY_MAX_BYTES - len(CHUNK), finish=True) == 422


@pytest.fixture(scope="module")
def short_body_timeout_port(module_processes: Processes) -> int:
    port = free_port()
    module_processes.start("api", "--port", str(port), env={"HEIMDEX_BODY_TIMEOUT_SECONDS": "1"})
    wait_for(lambda: _status(port, "GET", "/healthz") == 200, what="the API")
    return port


def _stalled(port: int, org_id: uuid.UUID, framing: str, *, trickle: bool) -> tuple[int, str]:
    """Open `POST /jobs`, send part of the body and never the rest (or, with `trickle`, one
    byte every 0.2 s for ever): the status and content type of the answer, after which the
    server must have closed the connection. A server that waits for the body never answers and
    the socket's timeout (a guard against a hung test, not a measure) fails the test."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    token = auth(org_id)["Authorization"]
    sock.sendall(
        f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode()
    )
    chunked = "chunked" in framing
    sock.sendall(b'5\r\n{"typ\r\n' if chunked else b'{"typ')
    stop = threading.Event()

    def drip() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                sock.sendall(b"1\r\n \r\n" if chunked else b" ")

    dripping = threading.Thread(target=drip, daemon=True)
    if trickle:
        dripping.start()
    try:
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        stop.set()
        answer = (resp.status, resp.getheader("content-type") or "")
        resp.read()
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:  # a dripped byte reached the closed socket
            closed = True
        assert closed, "the connection was left open"
        return answer
    finally:
        stop.set()
        sock.close()


@pytest.mark.xdist_group("edges_api")
@pytest.mark.parametrize("framing", ["Content-Length: 100", "Transfer-Encoding: chunked"])
@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
@pytest.mark.slow  # an API process, bytes on a socket
def test_a_body_that_never_finishes_is_cut_off_with_408(
    short_body_timeout_port: int, org_id: uuid.UUID, framing: str, trickle: bool
) -> None:
    port = short_body_timeout_port
    assert _stalled(port, org_id, framing, trickle=trickle) == (408, PROBLEM)
    # The server still serves: a whole body is taken as before.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("POST", "/jobs", json.dumps({"type": "noop"}), {**auth(org_id), **JSON})
    assert conn.getresponse().status == 201
    conn.close()


# PostgreSQL restarted under steady requests: a cluster of the test's own.


@pytest.fixture
def own_db_url() -> Iterator[tuple[LocalPostgres, URL]]:
    pg = LocalPostgres.throwaway().start()
    try:
        url = pg.create_database("ledger")
        command.upgrade(alembic_config(database_url=url), "head")
        yield pg, url
    finally:
        pg.destroy()


@pytest.mark.slow
def test_postgres_down_is_503_and_the_api_recovers(
    own_db_url: tuple[LocalPostgres, URL], processes: Processes
) -> None:
    pg, url = own_db_url
    env = {**FAST, "DATABASE_URL": url.render_as_string(hide_password=False)}
    port = free_port()
    api = processes.start("api", "--port", str(port), env=env)
    wait_for(lambda: _status(port, "GET", "/healthz") == 200, what="the API")
    headers = {**auth(uuid.uuid4()), "Content-Type": "application/json"}
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def steady() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        n = 0
        while not stop.wait(0.02):
            n += 1
            method, path, body = (
                ("POST", "/jobs", json.dumps({"type": "noop"})) if n % 2 else ("GET", "/jobs", None)
            )
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            seen.append((method, resp.status))
        conn.close()

    thread = threading.Thread(target=steady, daemon=True)
    thread.start()
    time.sleep(1)
    pg.stop()
    time.sleep(3)
    down_from = len(seen)
    pg.start()
    time.sleep(3)
    stop.set()
    thread.join()
    statuses = {status for _, status in seen}
    assert statuses <= {200, 201, 503}, sorted(statuses)
    assert any(s == 503 for _, s in seen[:down_from]), "the outage was not observed"
    # Fully back: the last second of requests all succeeded.
    assert all(200 <= s < 300 for _, s in seen[-20:]), seen[-20:]
    assert api.poll() is None  # the same process served before, during and after
    log = processes.log_of(api)
    assert "Traceback" not in log, log[-2000:]


def test_openapi_declares_every_error_as_problem_json(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            errors = {code for code in op["responses"] if code.startswith(("4", "5"))}
            assert {"400", "401", "413", "422", "503"} <= errors, (method, path)
            for code in errors:
                content = op["responses"][code]["content"]
                assert list(content) == [PROBLEM], (method, path, code)
                assert "detail" in content[PROBLEM]["schema"]["properties"]
    assert "404" in doc["paths"]["/jobs/{job_id}"]["get"]["responses"]
    assert "409" in doc["paths"]["/jobs"]["post"]["responses"]
