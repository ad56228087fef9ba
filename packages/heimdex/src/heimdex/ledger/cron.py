"""Cron expressions (five fields, UTC), through `cronsim`.

`cronsim` reads an expression in the time zone of the datetime it is given, and a timestamp
read from PostgreSQL comes in the session's zone (the server's default, the role's, PGTZ):
every instant is moved to UTC first, so `0 3 * * *` is 03:00 UTC for every worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError

from heimdex.errors import HeimdexError

_TICK = timedelta(microseconds=1)


class InvalidCron(HeimdexError):
    def __init__(self, expression: str, reason: str) -> None:
        super().__init__(
            f"{expression!r} is not a cron expression ({reason}); five fields, minute hour "
            "day-of-month month day-of-week, e.g. '*/15 * * * *'"
        )
        self.expression = expression


def check_cron(expression: str) -> str:
    """The expression, or `InvalidCron` saying what is wrong."""
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise InvalidCron(expression, str(exc)) from None
    if len(expression) > 200:
        raise InvalidCron(expression, "longer than 200 characters")
    return expression


def utc(at: datetime) -> datetime:
    """`at` in UTC; a naive datetime is taken as UTC."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def next_fire(expression: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`, in UTC."""
    result: datetime = next(CronSim(expression, utc(after)))
    return result


def last_fire(expression: str, now: datetime) -> datetime:
    """The latest fire time at or before `now`, in UTC."""
    result: datetime = next(CronSim(expression, utc(now) + _TICK, reverse=True))
    return result
