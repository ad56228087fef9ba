"""The idempotency fingerprint: one hash for one request body, whatever its key order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_fingerprint(body: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `body` (sorted keys, no insignificant spaces)."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()
