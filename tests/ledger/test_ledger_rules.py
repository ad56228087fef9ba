"""The shared rules: fingerprint, backoff, and the job-type registry."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from heimdex.errors import HeimdexError
from heimdex.ledger.backoff import retry_delay
from heimdex.ledger.errors import InvalidParams, UnknownJobType
from heimdex.ledger.fingerprint import request_fingerprint
from heimdex.ledger.registry import JobTypes, Registry, load_registry
from heimdex.models import BackoffPolicy


def test_fingerprint_ignores_key_order_and_sees_every_value() -> None:
    a = request_fingerprint({"type": "noop", "params": {"a": 1, "b": [1, 2]}})
    assert a == request_fingerprint({"params": {"b": [1, 2], "a": 1}, "type": "noop"})
    assert a != request_fingerprint({"type": "noop", "params": {"a": 1, "b": [2, 1]}})
    assert len(a) == 64


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (BackoffPolicy.NONE, [0.0, 0.0, 0.0, 0.0]),
        (BackoffPolicy.FIXED, [2.0, 2.0, 2.0, 2.0]),
        (BackoffPolicy.EXP, [2.0, 4.0, 8.0, 10.0]),
    ],
)
def test_retry_delay_per_policy_is_capped(policy: BackoffPolicy, expected: list[float]) -> None:
    assert [retry_delay(policy, n, base=2.0, cap=10.0) for n in (1, 2, 3, 4)] == expected
    with pytest.raises(ValueError, match="starts at 1"):
        retry_delay(policy, 0, base=2.0, cap=10.0)


def test_builtin_types_come_from_the_entry_point_with_handlers() -> None:
    registry = load_registry()
    assert registry.names() == ["heimdex.backfill", "mock_process", "noop"]
    assert registry.without_handler() == []
    with pytest.raises(UnknownJobType, match=r"known types: heimdex\.backfill, mock_process, noop"):
        registry.validate("transcode", {})
    with pytest.raises(InvalidParams, match="stage_seconds"):
        registry.validate("mock_process", {"stage_seconds": -1})
    assert registry.validate("mock_process", {}) == {"fail_at_stage": None, "stage_seconds": 0.5}


class _Params(BaseModel):
    asset: str


def test_an_application_adds_types_and_handlers_without_touching_the_ledger() -> None:
    api_side = JobTypes()
    api_side.declare("transcode", params=_Params)
    registry = Registry([("api", api_side)])
    assert registry.without_handler() == ["transcode"]
    worker_side = JobTypes()

    @worker_side.handler("transcode")
    def transcode(ctx: object, params: _Params) -> dict[str, str]:
        return {"asset": params.asset}

    both = Registry([("api", api_side), ("worker", worker_side)])
    assert both.without_handler() == []
    assert both.get("transcode").handler is transcode


def test_registry_refuses_clashes_and_bad_specs() -> None:
    a, b = JobTypes(), JobTypes()
    a.declare("x", params=_Params)
    b.declare("x", params=_Params)
    with pytest.raises(HeimdexError, match="declared by both a and b"):
        Registry([("a", a), ("b", b)])
    orphan = JobTypes()
    orphan.handler("ghost")(lambda ctx, p: {})
    with pytest.raises(HeimdexError, match="undeclared job type 'ghost'"):
        Registry([("orphan", orphan)])
    with pytest.raises(HeimdexError, match="module:attribute"):
        load_registry(["no_colon"])
    with pytest.raises(HeimdexError, match="cannot load job types"):
        load_registry(["nowhere.at_all:jobs"])
    with pytest.raises(HeimdexError, match="not a JobTypes collection"):
        load_registry(["heimdex.ledger.builtin:noop"])
    with pytest.raises(HeimdexError, match="declared twice"):
        a.declare("x", params=_Params)
