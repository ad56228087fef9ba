"""Log output, configured once by each entrypoint (never at import): aligned, coloured lines for
a person at a terminal, JSON lines for a log collector."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "process_label"}
# uvicorn duplicates its message with ANSI codes in it; never worth a field.
_DROPPED = {"color_message"}

# Third-party lines that say nothing a person needs at INFO: shown only at DEBUG. Alembic's
# "Running upgrade" lines repeat our own per-revision lines (which add [i/n] and the duration).
CHATTER = {
    "uvicorn.access": None,
    "alembic.runtime.migration": (
        "Context impl ",
        "Will assume ",
        "Running upgrade ",
        "Running downgrade ",
    ),
}

_LEVEL_STYLE = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_DIM, _CYAN, _RESET = "\x1b[2m", "\x1b[36m", "\x1b[0m"


class LogFormat(StrEnum):
    AUTO = "auto"
    CONSOLE = "console"
    JSON = "json"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and k not in _DROPPED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts`, `level`, `process`, `logger`, `msg`, then `extra`."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": getattr(record, "process_label", None) or self.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ConsoleFormatter(logging.Formatter):
    """`12:04:05.123 INFO  worker  message  key=value ...`, coloured when `color`."""

    def __init__(self, process: str = "", *, color: bool = False) -> None:
        super().__init__()
        self.process = process
        self.color = color

    def _paint(self, style: str, text: str) -> str:
        return f"{style}{text}{_RESET}" if self.color else text

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        level = record.levelname
        process = getattr(record, "process_label", None) or self.process or record.name
        fields = _fields(record)
        exc = fields.pop("exc", None)
        parts = [
            self._paint(_DIM, when),
            self._paint(_LEVEL_STYLE.get(level, ""), f"{level:<7}"),
            self._paint(_CYAN, f"{process:<7}"),
            record.getMessage(),
        ]
        line = " ".join(parts)
        if fields:
            rendered = " ".join(f"{k}={_scalar(v)}" for k, v in fields.items())
            line += "  " + self._paint(_DIM, rendered)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif isinstance(exc, str):
            line += "\n" + exc
        return line


def _scalar(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


class ChatterFilter(logging.Filter):
    """Demotes the `CHATTER` lines to DEBUG; they pass only when `show` (DEBUG level)."""

    def __init__(self, show: bool) -> None:
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in CHATTER or record.levelno > logging.INFO:
            return True
        prefixes = CHATTER[record.name]
        if prefixes is not None and not record.getMessage().startswith(prefixes):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.show


def is_terminal(stream: IO[str] | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def make_formatter(
    fmt: LogFormat | str, process: str, stream: IO[str] | None = None, *, color: bool = True
) -> logging.Formatter:
    """The formatter `fmt` names; `auto` means console on a terminal, JSON otherwise. Console
    lines are coloured on a terminal unless `color` is off (the `NO_COLOR` setting)."""
    fmt = LogFormat(fmt)
    if fmt is LogFormat.JSON or (fmt is LogFormat.AUTO and not is_terminal(stream)):
        return JsonFormatter(process)
    return ConsoleFormatter(process, color=color and is_terminal(stream))


def _level(level: int | str) -> int:
    return level if isinstance(level, int) else logging.getLevelNamesMapping()[level.upper()]


def configure_logging(
    process: str,
    *,
    fmt: LogFormat | str = LogFormat.AUTO,
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    stream_level: int | str | None = None,
    file: Path | None = None,
    color: bool = True,
    quiet_chatter: bool = True,
) -> None:
    """The one logging setup of every entrypoint (api, worker, dev, db, jobs prune, and plain
    `alembic` through env.py); nothing else installs a handler (ruff bans `logging.basicConfig`
    and `logging.config`).

    `process` names the lines (`api`, `worker`, ...). `fmt` picks the stream's format (the
    `HEIMDEX_LOG_FORMAT` setting). `stream_level` raises the stream's threshold above `level`
    when a `file` (always JSON) keeps everything, as `heimdex dev` does. `quiet_chatter` off
    keeps the `CHATTER` lines at their level: plain `alembic` has no lines of ours to replace
    its "Running upgrade" ones.
    """
    root_level = _level(level)
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler = logging.StreamHandler(out)
    handler.setFormatter(make_formatter(fmt, process, out, color=color))
    handler.setLevel(_level(stream_level) if stream_level is not None else root_level)
    handlers = [handler]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(file, encoding="utf-8")
        to_file.setFormatter(JsonFormatter(process))
        to_file.setLevel(root_level)
        handlers.append(to_file)
    for h in handlers:
        if quiet_chatter:
            h.addFilter(ChatterFilter(show=root_level <= logging.DEBUG))
        h._heimdex = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replaces an earlier call's handlers only: a host's own (pytest's capture) stay.
    for old in [h for h in root.handlers if getattr(h, "_heimdex", False)]:
        old.close()
        root.removeHandler(old)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(root_level)
    if quiet_chatter:
        # A logger whose every line is chatter (uvicorn's access line per request) makes no
        # record at all unless DEBUG would show it: the filter above would drop it anyway.
        for name, prefixes in CHATTER.items():
            if prefixes is None:
                shown = root_level <= logging.DEBUG
                logging.getLogger(name).setLevel(logging.NOTSET if shown else logging.WARNING)


def render_json_line(line: str, formatter: logging.Formatter) -> str:
    """A JSON log line re-rendered by `formatter`; anything else (a traceback) as it is."""
    try:
        data = json.loads(line)
    except ValueError:
        return line.rstrip("\n")
    if not isinstance(data, dict) or "msg" not in data:
        return line.rstrip("\n")
    try:
        created = datetime.fromisoformat(str(data.pop("ts"))).timestamp()
    except (KeyError, ValueError):
        created = datetime.now(UTC).timestamp()
    level = str(data.pop("level", "info")).upper()
    attrs: dict[str, object] = {
        "name": data.pop("logger", ""),
        "msg": str(data.pop("msg")),
        "levelname": level,
        "levelno": logging.getLevelNamesMapping().get(level, logging.INFO),
        "created": created,
        "process_label": data.pop("process", ""),
    }
    record = logging.makeLogRecord(attrs)
    for key, value in data.items():
        setattr(record, key, value)
    return formatter.format(record)
