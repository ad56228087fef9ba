"""schemathesis against a real API process on real PostgreSQL, with a valid token: every
answer is declared in the OpenAPI document (status, media type, schema) and none is a 5xx.
Bounded and repeatable: a fixed number of valid and of invalid examples per operation,
derandomized.

The generators reach input PostgreSQL cannot hold: every date-time (in a body or a query) is
drawn from extreme years and offsets too, and every free-form string of a request body (and every
value of `params`) may carry NUL characters and lone surrogates, which schemathesis's own
alphabet leaves out."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import unregister_string_format

from heimdex_db.localpg import free_port
from tests.conftest import DatabaseFactory
from tests.stack import FAST, auth, wait_for

pytestmark = pytest.mark.slow  # an API process under a fuzzer

EXAMPLES = 40
SHARDS = 2
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

TEXT_FORMAT = "heimdex-text"
UNSTORABLE = ["\x00", "\ud800", "\udfff", "\udbff\udbff"]
TEXT = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=3), st.sampled_from(UNSTORABLE)), max_size=4).map("".join),
)
OFFSETS = [UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-14))]
# A job's `type` is a registered one half the time, so that bodies reach the insert.
JOB_TYPE_FORMAT = "heimdex-job-type"
JOB_TYPE = st.one_of(st.sampled_from(["noop", "mock_process"]), TEXT)
# Past year 9999 or before year 1 in UTC, and just outside the accepted window.
EXTREMES = [
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00+14:00",
    "1969-12-31T23:59:59Z",
    "2999-01-01T00:00:00Z",
]
DATE_TIMES = st.one_of(
    st.sampled_from(EXTREMES),
    st.datetimes(timezones=st.sampled_from(OFFSETS)).map(datetime.isoformat),
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ).map(datetime.isoformat),
)


def _with_unstorable_text(raw: dict[str, Any]) -> dict[str, Any]:
    """The document, its request bodies' free-form strings given `TEXT_FORMAT` and their
    free-form objects (`params`) values of that format, a job's `type` often one the server
    knows, and every date-time required, so that each body carries one. Response schemas are
    left as they are: the answers are checked against the document as served."""
    schemas = raw["components"]["schemas"]
    todo: list[Any] = [
        op["requestBody"] for path in raw["paths"].values() for op in path.values()
        if "requestBody" in op
    ]  # fmt: skip
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref", "")
        name = ref.rsplit("/", 1)[-1]
        if ref.startswith("#/components/schemas/") and name not in seen:
            seen.add(name)
            todo.append(schemas[name])
        if node.get("type") == "string" and not {"format", "enum", "pattern", "const"} & set(node):
            node["format"] = TEXT_FORMAT
        if node.get("type") == "object" and node.get("additionalProperties") is True:
            node["additionalProperties"] = {"type": "string", "format": TEXT_FORMAT}
        properties = node.get("properties", {}) if node.get("type") == "object" else {}
        if "type" in properties:
            properties["type"] = {"type": "string", "format": JOB_TYPE_FORMAT}
        for name, prop in properties.items():
            if any(p.get("format") == "date-time" for p in [prop, *prop.get("anyOf", [])]):
                properties[name] = {"type": "string", "format": "date-time"}
                node["required"] = sorted({*node.get("required", []), name})
        todo.extend(node.values())
    return raw


@pytest.fixture
def unstorable_formats() -> Iterator[None]:
    formats = {TEXT_FORMAT: TEXT, JOB_TYPE_FORMAT: JOB_TYPE, "date-time": DATE_TIMES}
    for name, strategy in formats.items():
        schemathesis.openapi.format(name, strategy)
    try:
        yield
    finally:
        for name in formats:
            unregister_string_format(name)


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
        wait_for(up, what="the API", timeout=120)  # two start at once on a loaded machine
        yield base
    finally:
        proc.kill()
        proc.wait()
        log.close()


# schemathesis' pytest integration (`@schema.parametrize()`, `from_fixture`) fails on pytest 9
# (no `_nodeid` on its items), so each operation's strategy runs under Hypothesis here.
# The operations are dealt into SHARDS tests, which pytest-xdist runs side by side (each worker
# running one starts an API process of its own).
@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_answer_is_declared_and_none_is_a_server_error(
    api_url: str, unstorable_formats: None, shard: int
) -> None:
    raw = requests.get(f"{api_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(_with_unstorable_text(raw))
    schema.config.update(base_url=api_url)
    headers = auth(ORG)
    ran: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, operations
    # Those with a body (the costly ones to generate and to answer) first: dealt evenly.
    operations.sort(key=lambda op: "requestBody" not in raw["paths"][op.path][op.method])
    for operation, mode in itertools.product(operations[shard::SHARDS], GenerationMode):
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
        except UnicodeEncodeError as exc:
            # Schemathesis checks each mutated (negative) body against the schema with
            # jsonschema_rs, which cannot encode a lone surrogate: the generator fails before
            # a request is sent. Nothing reached the API; its valid bodies were fuzzed above.
            assert mode is GenerationMode.NEGATIVE and "surrogate" in str(exc), (
                operation.path,
                exc,
            )
    assert ran and all(count > 0 for count in ran.values()), ran
