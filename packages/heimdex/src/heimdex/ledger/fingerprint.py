"""Fingerprints: the idempotency hash of a request body (whatever its key order), and the
error fingerprint that groups failures."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any


def canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_fingerprint(body: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `body` (sorted keys, no insignificant spaces)."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER = re.compile(r"[0-9]+")


def error_fingerprint(code: str | None, message: str | None) -> str:
    """12 hex digits naming a kind of failure: the code and the message with UUIDs and numbers
    masked. The twin of `repository.ERROR_FINGERPRINT_SQL`, which groups and filters by it."""
    masked = _NUMBER.sub("<n>", _UUID.sub("<uuid>", message or ""))
    return hashlib.md5(f"{code or ''}:{masked}".encode(), usedforsecurity=False).hexdigest()[:12]
