"""Log output for the standalone server: one line per event, as text or JSON.

In JSON, every line the server writes to stderr is one JSON object, from the first:
problems found before the server runs (:func:`startup_error_line`), Python warnings and
exceptions that escape a thread included. grpc core writes its own lines in its own
format and offers no way to route them here (grpc/grpc#38703): the server re-logs what
it wrote during start-up and silences it after (``server/_process.py``,
docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Final, Literal

__all__ = ["WarningTally", "configure_logging", "startup_error_line"]

# Fields that callers attach with ``extra=`` and that the JSON format carries as keys.
_EXTRA_FIELDS: Final = (
    "event",
    "service",
    "status",
    "previous",
    "address",
    "port",
    "kind",
    "count",
    "budget_mib",
    "source",
)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _EXTRA_FIELDS:
            if field in record.__dict__:
                entry[field] = record.__dict__[field]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def startup_error_line(message: str, *, fmt: Literal["text", "json"] | str, prog: str) -> str:
    """One line for a problem that stops *prog* before it runs, in the log format *fmt*.

    Text keeps the command-line convention ``<prog>: error: <message>``; JSON is a log
    record like every other line (level ``error``, ``event`` ``startup_error``).
    """
    if fmt != "json":
        return f"{prog}: error: {message}"
    record = logging.makeLogRecord(
        {
            "name": "petsage_grpc.cli",
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": message,
            "event": "startup_error",
        }
    )
    return _JsonFormatter().format(record)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "a thread"
    logging.getLogger("petsage_grpc").error(
        "unexpected error in %s",
        thread,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def configure_logging(*, level: str, fmt: Literal["text", "json"] | str) -> None:
    """Send every log record at *level* or above to stderr, one line each, in *fmt*.

    Python warnings and exceptions that end a thread are logged too, so that they
    follow *fmt* rather than print their own lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception


class WarningTally:
    """One warning line per kind of event per *period*, with how many there were.

    For what a client can cause at will (malformed requests, refused connections): the
    first of a kind is logged at once, later ones are counted and reported in one line
    when the next one comes after *period* seconds, so a flood costs a line a minute.
    """

    def __init__(self, logger: logging.Logger, what: str, *, period: float = 60.0) -> None:
        self._logger = logger
        self._what = what
        self._period = period
        self._counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def add(self, kind: str) -> None:
        """Count one event of *kind* (a short fixed text, never client input)."""
        now = time.monotonic()
        self._counts[kind] = self._counts.get(kind, 0) + 1
        last = self._logged_at.get(kind)
        if last is not None and now - last < self._period:
            return
        count = self._counts.pop(kind)
        self._logged_at[kind] = now
        if last is None:
            self._logger.warning(
                "%s: %s (more are counted, one line a minute)",
                self._what,
                kind,
                extra={"event": "tally", "kind": kind, "count": count},
            )
        else:
            self._logger.warning(
                "%s: %s, %d in the last %.0f s",
                self._what,
                kind,
                count,
                now - last,
                extra={"event": "tally", "kind": kind, "count": count},
            )
