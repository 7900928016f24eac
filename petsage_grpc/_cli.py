"""Command line: ``petsage-grpc serve`` and ``petsage-grpc probe``.

Kept free of grpc imports at module level: ``probe`` runs as a Kubernetes exec probe
and must start fast, and ``serve`` should report a bad flag before loading anything.

Exit codes of ``serve``: 0 stopped cleanly after a signal; 2 bad flag, bad
environment variable or cannot listen (one line on stderr, nothing left running).
``probe`` exits as grpc_health_probe does (see ``petsage_grpc._probe``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = ["main"]

PROG = "petsage-grpc"
ENV_PREFIX = "PETSAGE_GRPC_"
EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, not {text!r}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text.lower()

    return convert


def _host(text: str) -> str:
    if any(c.isspace() for c in text) or "/" in text:
        raise argparse.ArgumentTypeError(f"not a host name or IP address: {text!r}")
    return text.strip("[]") if text.startswith("[") else text


@dataclass(frozen=True)
class _Option:
    flag: str
    convert: Callable[[str], Any]
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def _serve_options() -> tuple[_Option, ...]:
    from petsage_grpc._logging import LOG_FORMATS, LOG_LEVELS  # noqa: PLC0415

    return (
        _Option("--host", _host, "", "address to listen on (default: every interface)"),
        _Option("--port", _port, 50051, "TCP port; 0 picks a free one (default: 50051)"),
        _Option("--log-level", _choice(*LOG_LEVELS), "info", "debug, info, warning or error"),
        _Option("--log-format", _choice(*LOG_FORMATS), "text", "text or json (one object a line)"),
        _Option(
            "--drain-seconds",
            _seconds,
            5.0,
            "after SIGTERM, keep answering with readiness NOT_SERVING this long (default: 5)",
        ),
        _Option(
            "--grace-seconds",
            _seconds,
            5.0,
            "then give calls in flight this long to finish (default: 5)",
        ),
    )


def _resolve(
    options: Sequence[_Option], parsed: argparse.Namespace, environ: dict[str, str]
) -> dict[str, Any]:
    """Flags win over environment variables, which win over defaults."""
    values: dict[str, Any] = {}
    for option in options:
        value = getattr(parsed, option.dest)
        if value is None and option.env in environ:
            try:
                value = option.convert(environ[option.env])
            except argparse.ArgumentTypeError as error:
                raise _UsageError(f"environment variable {option.env}: {error}") from None
        values[option.dest] = option.default if value is None else value
    return values


def _serve(argv: Sequence[str], environ: dict[str, str]) -> int:
    options = _serve_options()
    parser = _Parser(
        prog=f"{PROG} serve",
        description="Serve grpc.health.v1.Health, petsage.v1.SmokeTestService and reflection.",
        epilog=f"Every option can also be set as an environment variable {ENV_PREFIX}<NAME>, "
        f"e.g. {ENV_PREFIX}PORT=50052; flags win.",
    )
    for option in options:
        parser.add_argument(option.flag, type=option.convert, default=None, help=option.help)
    parsed = parser.parse_args(argv)
    try:
        values = _resolve(options, parsed, environ)
    except _UsageError as error:
        parser.error(str(error))

    import asyncio  # noqa: PLC0415 - heavy imports only once the flags are valid

    from petsage_grpc._logging import configure_logging  # noqa: PLC0415
    from petsage_grpc._server import ListenError, ServeOptions, serve  # noqa: PLC0415

    configure_logging(level=values.pop("log_level"), fmt=values.pop("log_format"))
    try:
        asyncio.run(serve(ServeOptions(**values)))
    except ListenError as error:
        print(f"{PROG} serve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: Sequence[str] | None = None, *, environ: dict[str, str] | None = None) -> int:
    """Run the command line with *argv* (default: ``sys.argv[1:]``) and return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    if args and args[0] == "probe":
        from petsage_grpc._probe import run_probe  # noqa: PLC0415

        return run_probe(args[1:])
    parser = _Parser(
        prog=PROG,
        description="The PetSage gRPC health service.",
        epilog=f"Run '{PROG} serve --help' or '{PROG} probe -help' for a command's options.",
    )
    parser.add_argument("command", choices=("serve", "probe"), help="serve, or probe a server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    if not args or args[0] not in {"serve", "probe"}:
        parser.parse_args(args)  # prints help, the version, or a one-line error
        return EXIT_USAGE
    return _serve(args[1:], environ)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("petsage-grpc")
    except PackageNotFoundError:
        return "unknown"
