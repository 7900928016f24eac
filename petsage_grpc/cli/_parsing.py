"""The command line's argument parsing, loaded only by ``serve`` and the top-level help.

argparse is not on the path of ``probe``, which runs as an exec probe and must start fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

__all__ = [
    "EXIT_USAGE",
    "LOG_FORMAT_ENV",
    "Parser",
    "argparse_type",
    "early_log_format",
    "error_line",
    "valid_format",
]

EXIT_USAGE = 2
LOG_FORMAT_ENV = "PETSAGE_GRPC_LOG_FORMAT"
_LOG_FORMATS = ("text", "json")


def error_line(message: str, *, fmt: str, prog: str) -> str:
    """*message* as one line of stderr in the log format *fmt*."""
    if fmt != "json":  # the common case needs no import
        return f"{prog}: error: {message}"
    from petsage_grpc.server._logging import startup_error_line  # noqa: PLC0415

    return startup_error_line(message, fmt=fmt, prog=prog)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr, in the log format, and exit 2."""

    log_format = "text"

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, error_line(message, fmt=self.log_format, prog=self.prog) + "\n")


class _UnreadableFlagsError(Exception):
    """The flags cannot be read far enough to find --log-format."""


class _LenientParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UnreadableFlagsError(message)


def valid_format(value: object) -> str | None:
    text = str(value).lower() if isinstance(value, str) else None
    return text if text in _LOG_FORMATS else None


def early_log_format(argv: Sequence[str], environ: Mapping[str, str], flags: Sequence[str]) -> str:
    """The log format as far as it is known before the flags are parsed for real.

    *flags* are every option ``serve`` takes, so that abbreviations resolve as they will.
    """
    lenient = _LenientParser(add_help=False)
    for flag in flags:
        lenient.add_argument(flag)
    try:
        known, _ = lenient.parse_known_args(argv)
        from_flag = valid_format(known.log_format)
    except _UnreadableFlagsError:
        from_flag = None
    return from_flag or valid_format(environ.get(LOG_FORMAT_ENV)) or "text"


def argparse_type(convert: Callable[[object], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse
