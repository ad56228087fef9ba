"""Cron expressions (five fields, UTC), through `cronsim`."""

from __future__ import annotations

from datetime import datetime, timedelta

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


def next_fire(expression: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`."""
    result: datetime = next(CronSim(expression, after))
    return result


def last_fire(expression: str, now: datetime) -> datetime:
    """The latest fire time at or before `now`."""
    result: datetime = next(CronSim(expression, now + _TICK, reverse=True))
    return result
