"""What the API process holds for its lifetime, built in the lifespan, never at import."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from heimdex_api.metrics import ApiMetrics
from heimdex_common.ledger.registry import Registry
from heimdex_common.settings import Settings


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    registry: Registry
    metrics: ApiMetrics
    schema_head: str | None
