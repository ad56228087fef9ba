"""The Dramatiq side: a Redis broker and the one actor, both built by the entrypoint."""

from __future__ import annotations

from collections.abc import Callable

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, ShutdownNotifications, TimeLimit
from dramatiq.middleware.retries import Retries

from heimdex_common.settings import Settings

ACTOR_NAME = "run_job"
# The lease and the reaper bound a stuck attempt; Dramatiq's own timer would only kill threads.
TIME_LIMIT_MS = 24 * 3600 * 1000


def make_broker(settings: Settings) -> RedisBroker:
    """A broker on `REDIS_URL`. Connects lazily. Dramatiq's retries are off: the ledger decides
    every retry (`max_attempts`, `backoff_policy`), and a message is only ever a wake-up call."""
    return RedisBroker(
        url=settings.redis_url,
        middleware=[AgeLimit(), TimeLimit(), ShutdownNotifications(), Retries(max_retries=0)],
    )


def declare_actor(
    broker: dramatiq.Broker, run: Callable[[str], None], *, queue_name: str
) -> dramatiq.Actor[[str], None]:
    return dramatiq.actor(
        run,
        broker=broker,
        actor_name=ACTOR_NAME,
        queue_name=queue_name,
        max_retries=0,
        time_limit=TIME_LIMIT_MS,
    )


def delivery_message(job_id: str, queue_name: str) -> dramatiq.Message[None]:
    return dramatiq.Message(
        queue_name=queue_name, actor_name=ACTOR_NAME, args=(job_id,), kwargs={}, options={}
    )
