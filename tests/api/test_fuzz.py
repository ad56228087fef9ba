"""schemathesis against a real API process on real PostgreSQL, with a valid token: every
answer is declared in the OpenAPI document (status, media type, schema) and none is a 5xx.
Bounded and repeatable: a fixed number of valid and of invalid examples per operation,
derandomized."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from heimdex_db.localpg import free_port
from tests.conftest import DatabaseFactory
from tests.stack import FAST, auth, wait_for

EXAMPLES = 40
# Server errors and conformance of every answer to the document. Not positive_data_acceptance:
# a schema-valid `type` naming no registered job type is rightly a 422 (the registry is loaded
# at startup, so the document cannot enumerate it).
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.allow_header_conformance,
]
ORG = uuid.UUID("00000000-0000-4000-8000-00000000f022")


@pytest.fixture(scope="module")
def api_url(
    create_database: DatabaseFactory, head_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    url = create_database(template=head_template)
    port = free_port()
    log = (Path(tmp_path_factory.mktemp("fuzz")) / "api.log").open("wb")
    env = {
        **os.environ,
        **FAST,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "HEIMDEX_ENV": "local",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heimdex",
            *("api", "--port", str(port)),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, what="the API")
        yield base
    finally:
        proc.kill()
        proc.wait()
        log.close()


# schemathesis' pytest integration (`@schema.parametrize()`, `from_fixture`) fails on pytest 9
# (no `_nodeid` on its items), so each operation's strategy runs under Hypothesis here.
def test_every_answer_is_declared_and_none_is_a_server_error(api_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    headers = auth(ORG)
    ran: dict[str, int] = {}
    for mode, result in itertools.product(GenerationMode, schema.get_all_operations()):
        operation = result.ok()
        ran.setdefault(f"{operation.method.upper()} {operation.path}", 0)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            ran[f"{case.method.upper()} {case.operation.path}"] += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid request to generate.
            assert mode is GenerationMode.NEGATIVE, operation.path
    assert len(ran) >= 8 and all(count > 0 for count in ran.values()), ran
