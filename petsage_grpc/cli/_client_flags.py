"""The flags and output shared by ``status`` and ``fleet``: connection, bounds, colours."""

from __future__ import annotations

import argparse
import os
from typing import Any, TextIO

from petsage_grpc._durations import parse_duration
from petsage_grpc.cli._probe import EXIT_INVALID_ARGUMENTS
from petsage_grpc.services._auth import BearerToken

__all__ = ["Parser", "add_client_flags", "add_fleet_flags", "paint"]

_TOKEN_ENV = "PETSAGE_GRPC_AUTH_TOKEN_FILE"  # noqa: S105 - a variable name
_COLOURS = {"SERVING": "\033[32m", "NOT_SERVING": "\033[31m"}
_OTHER_COLOUR = "\033[33m"
_RESET = "\033[0m"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument exits 1 (the probe's code for invalid arguments)."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_INVALID_ARGUMENTS, f"{self.prog}: error: {message}\n")


def add_fleet_flags(parser: argparse.ArgumentParser) -> None:
    """The fleet view's bounds, shared by ``status --discover`` and ``fleet``."""
    parser.add_argument(
        "--max-replicas",
        type=int,
        default=100,
        help="follow at most this many replicas, the first in address order (default: 100)",
    )
    parser.add_argument(
        "--resolve-every", default="5s", help="resolve the targets again this often (default: 5s)"
    )


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """How to reach a server: timeout, token and TLS (``status`` and ``fleet``)."""
    parser.add_argument("--timeout", default="2s", help="connect and RPC timeout (default: 2s)")
    parser.add_argument(
        "--token-file",
        default=os.environ.get(_TOKEN_ENV),
        help=f"bearer token for List and the check list (default: ${_TOKEN_ENV})",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS")
    parser.add_argument("--tls-no-verify", action="store_true", help="do not verify the server")
    parser.add_argument("--tls-ca-cert", default="", help="CA certificates to verify the server")
    parser.add_argument("--tls-client-cert", default="", help="client certificate (mTLS)")
    parser.add_argument("--tls-client-key", default="", help="client private key (mTLS)")
    parser.add_argument("--tls-server-name", default="", help="name to verify the server as")


def paint(state: str, out: TextIO) -> str:
    """*state* coloured on a terminal (unless NO_COLOR), plain otherwise."""
    if not out.isatty() or os.environ.get("NO_COLOR"):
        return state
    return f"{_COLOURS.get(state, _OTHER_COLOUR)}{state}{_RESET}"


def client_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[float, str | None]:
    """``--timeout`` in seconds and the ``--token-file``'s token; a bad one is a usage error."""
    try:
        timeout = parse_duration(args.timeout)
        token = BearerToken.read_file(args.token_file) if args.token_file else None
    except ValueError as error:
        parser.error(str(error))
    if timeout <= 0:
        parser.error("--timeout must be greater than zero")
    return timeout, token
