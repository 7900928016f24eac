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

__all__ = [
    "WarningTally",
    "component_states",
    "configure_logging",
    "set_component_state",
    "startup_error_line",
    "warning_counts",
]

# Process-wide, for /metrics and /livez?verbose: every event a WarningTally counted, by
# kind (fixed texts), and the state of the server's background parts (None: working).
_warning_totals: dict[str, int] = {}
_components: dict[str, str | None] = {}
_totals_lock = threading.Lock()

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
    quiet_client_errors()


_CLIENT_GONE: Final = "answer to a client that had gone"


class _ClientErrorFilter(logging.Filter):
    """Turns grpc.aio's traceback for an answer whose connection has gone into a count.

    grpc.aio logs ``ExecuteBatchError raised in core by servicer method`` at ERROR, with a
    7-line traceback, whenever a handler finishes a call whose client reset it or dropped
    its connection meanwhile (a stream-unary registration, as every method here is): a
    client that does that at will wrote a line a millisecond. It is what a client did,
    not a fault of the server.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tally = WarningTally(logging.getLogger("petsage_grpc.server"), "client behaviour")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ == "ExecuteBatchError":
            self._tally.add(_CLIENT_GONE)
            return False
        return True


def quiet_client_errors() -> None:
    """Count, rather than log with a traceback, the errors grpc.aio logs for client behaviour.

    Idempotent; :func:`configure_logging` calls it.
    """
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _ClientErrorFilter) for f in cygrpc.filters):
        cygrpc.addFilter(_ClientErrorFilter())


def warning_counts() -> dict[str, int]:
    """Events every :class:`WarningTally` of the process counted since start, by kind."""
    with _totals_lock:
        return dict(_warning_totals)


def set_component_state(name: str, problem: str | None) -> None:
    """Record that the background part *name* works (*problem* None) or why it does not."""
    with _totals_lock:
        _components[name] = problem


def component_states() -> dict[str, str | None]:
    """Every background part that reported, and its problem (None: working)."""
    with _totals_lock:
        return dict(_components)


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
        with _totals_lock:
            _warning_totals[kind] = _warning_totals.get(kind, 0) + 1
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
