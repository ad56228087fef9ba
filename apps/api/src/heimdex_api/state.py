"""What the API process holds for its lifetime, built in the lifespan, never at import."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from heimdex_api.metrics import ApiMetrics
from heimdex_common.settings import Settings


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    redis: redis.Redis
    metrics: ApiMetrics
    schema_head: str | None
