"""What the API process holds for its lifetime, built in the lifespan, never at import."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from heimdex.ledger.registry import Registry
from heimdex.replica import ReadEngines
from heimdex.settings import Settings
from heimdex_api.metrics import ApiMetrics


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    # Reads that accept lag: the replica of HEIMDEX_READ_DATABASE_URL, or the primary.
    reads: ReadEngines
    registry: Registry
    metrics: ApiMetrics
    schema_head: str | None
    # Every revision this code ships: the database at another one is ahead (a newer release's).
    schema_known: frozenset[str] = frozenset()
