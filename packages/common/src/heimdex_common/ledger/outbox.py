"""The transactional outbox: deliveries written with the job, published by the dispatcher."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from heimdex_common.models import ERROR_MESSAGE_MAX, JobOutbox

logger = logging.getLogger(__name__)

DEFAULT_QUEUE = "default"


def enqueue_delivery(
    session: Session,
    job_id: uuid.UUID,
    *,
    delay_seconds: float = 0.0,
    queue_name: str = DEFAULT_QUEUE,
) -> JobOutbox:
    """Add a message asking for `job_id` to be delivered to a worker after `delay_seconds`."""
    message = JobOutbox(
        job_id=job_id,
        queue_name=queue_name,
        deliver_after=func.now() + timedelta(seconds=delay_seconds),
    )
    session.add(message)
    session.flush()
    return message


def due_messages(session: Session, *, limit: int) -> Sequence[JobOutbox]:
    """Unsent messages whose time has come, oldest first, locked for this transaction.

    SKIP LOCKED lets several dispatchers drain one outbox without sending a message twice.
    """
    return session.scalars(
        select(JobOutbox)
        .where(JobOutbox.sent_at.is_(None), JobOutbox.deliver_after <= func.now())
        .order_by(JobOutbox.deliver_after, JobOutbox.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


@dataclass(frozen=True)
class DispatchResult:
    sent: int
    error: str | None = None


def dispatch_due(
    session: Session, publish: Callable[[JobOutbox], None], *, limit: int
) -> DispatchResult:
    """Publish due messages in order and mark them sent; stop at the first publish error.

    The failed message keeps `sent_at` NULL with its error and attempt count, so the next
    round retries it. A crash between publishing and the caller's commit publishes a message
    twice; the worker's conditional claim makes the second delivery a no-op.
    """
    sent = 0
    for message in due_messages(session, limit=limit):
        try:
            publish(message)
        except Exception as exc:  # the broker's errors are not ours to enumerate
            message.publish_attempts += 1
            message.last_error = f"{type(exc).__name__}: {exc}"[:ERROR_MESSAGE_MAX]
            session.flush()
            return DispatchResult(sent=sent, error=message.last_error)
        message.sent_at = func.now()
        sent += 1
    session.flush()
    return DispatchResult(sent=sent)


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    oldest_due_seconds: float


def outbox_stats(session: Session) -> OutboxStats:
    """Messages not yet sent, and how long the oldest due one has waited (the dispatch lag)."""
    pending, lag = session.execute(
        select(
            func.count(),
            func.coalesce(
                func.max(func.extract("epoch", func.now() - JobOutbox.deliver_after)).filter(
                    JobOutbox.deliver_after <= func.now()
                ),
                0,
            ),
        ).where(JobOutbox.sent_at.is_(None))
    ).one()
    return OutboxStats(pending=int(pending), oldest_due_seconds=float(lag))


def purge_sent(session: Session, *, older_than_seconds: float) -> int:
    """Delete messages sent longer ago than `older_than_seconds`; returns how many."""
    result = session.execute(
        delete(JobOutbox).where(
            JobOutbox.sent_at < func.now() - timedelta(seconds=older_than_seconds)
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
