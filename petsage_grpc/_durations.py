"""Durations written as Go writes them ("500ms", "1s", "1m30s"), as flags and config use them."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["format_go_duration", "parse_duration", "parse_go_duration"]

_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION: Final = re.compile(f"(?:{_DURATION_PART.pattern})+")


def parse_go_duration(text: str) -> float:
    """Parse a Go duration ("1s", "250ms", "1m30s", "0") into seconds.

    Raises:
        ValueError: *text* is not a Go duration.
    """
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    if not _DURATION.fullmatch(body):
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(body))


def format_go_duration(seconds: float) -> str:  # noqa: PLR0911 - one return per unit
    """Format *seconds* as Go's ``time.Duration.String`` does ("1s", "1.5s", "250ms", "1m30s")."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign, nanos = ("-", -nanos) if nanos < 0 else ("", nanos)

    def trim(value: float) -> str:
        return f"{value:.9f}".rstrip("0").rstrip(".")

    if nanos < 1_000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return f"{sign}{trim(nanos / 1e3)}µs"
    if nanos < 1_000_000_000:
        return f"{sign}{trim(nanos / 1e6)}ms"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = trim(rest / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def parse_duration(value: object) -> float:
    """Parse a configuration duration: a Go duration string, or a number of seconds.

    Raises:
        ValueError: *value* is neither, or is negative or infinite.
    """
    expected = 'a duration such as "500ms", "1s" or "1m30s", or a number of seconds'
    seconds: float | None = None
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value.strip())
        except ValueError:
            seconds = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    if seconds is None:
        raise ValueError(f"expected {expected}, not {value!r}")
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"a duration must be finite and not negative, not {value!r}")
    return seconds
