"""What Heimdex accepts to store: text PostgreSQL can hold, and timestamps in a window that
every reader can read back. The API applies these to every input; they live here so the CLI and
the library judge a value the same way."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

# PostgreSQL holds 4713 BC to 294276 AD; Python's datetime, years 1 to 9999. A run_at decades
# ahead is a typo, not a plan, and a row past year 9999 (in UTC) could not be read back.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
HORIZON = timedelta(days=36525)
HORIZON_TEXT = "100 years from now"

Path = tuple[str | int, ...]


def timestamp_problem(value: datetime, now: datetime | None = None) -> str | None:
    """Why `value` (an aware datetime) is not accepted, or None when it is: it must lie between
    `EARLIEST` and `HORIZON` from now."""
    latest = (now or datetime.now(UTC)) + HORIZON
    if EARLIEST <= value <= latest:
        return None
    return (
        f"{value.isoformat()} is outside the accepted window"
        f" ({EARLIEST.isoformat().replace('+00:00', 'Z')} to {HORIZON_TEXT})"
    )


def text_problem(value: object, path: Path = ()) -> tuple[Path, str] | None:
    """Where in `value` (a string, or JSON-like dicts and lists of them) the first string
    PostgreSQL cannot store is, and why: a NUL character (text and jsonb hold none) or a lone
    surrogate (not encodable as UTF-8). None when every string (and key) is storable."""
    if isinstance(value, str):
        reason = _unstorable(value)
        return None if reason is None else (path, reason)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and (reason := _unstorable(key)) is not None:
                return path, f"a key {reason[0].lower()}{reason[1:]}"
            found = text_problem(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = text_problem(item, (*path, index))
            if found is not None:
                return found
    return None


def _unstorable(text: str) -> str | None:
    if "\x00" in text:
        return "Contains a NUL character (\\u0000), which PostgreSQL text cannot hold"
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return (
            f"Contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not"
            " encodable as UTF-8"
        )
    return None
