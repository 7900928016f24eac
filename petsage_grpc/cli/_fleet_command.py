"""``petsage-grpc status --discover`` and ``petsage-grpc fleet``: every replica at a glance.

``status --discover TARGET`` prints one table (a row per replica, a column per name),
and with ``--watch`` each event after it, prefixed by the replica. ``fleet --discover
TARGET --http-port N`` serves the same view as a page and prints the events.
Exit codes as ``status``: 0 every replica answers and every name is SERVING; 4 some
replica does not answer, drains or has a name not SERVING; 2 no replica found, or none
answers; 1 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from petsage_grpc._durations import parse_duration
from petsage_grpc.cli._client import Connection
from petsage_grpc.cli._client_flags import (
    Parser,
    add_client_flags,
    add_fleet_flags,
    client_settings,
    paint,
)
from petsage_grpc.cli._probe import (
    EXIT_CONNECTION_FAILURE,
    EXIT_INVALID_ARGUMENTS,
    EXIT_SERVING,
    EXIT_UNHEALTHY,
)
from petsage_grpc.fleet._discovery import DiscoveryError, Target, check_available, parse_target

if TYPE_CHECKING:
    import grpc

    from petsage_grpc.fleet._follower import Fleet, FleetEvent

__all__ = ["run_fleet", "run_status_fleet"]

_RETRY_FIRST_MS = 500
_RETRY_MAX_MS = 5000
_MAX_REPLICAS_CEILING = 10_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Options:
    targets: list[Target]
    connection: Connection
    metadata: tuple[tuple[str, str], ...] | None
    timeout: float
    max_replicas: int
    resolve_every: float


def _options(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    timeout: float,
    token: str | None,
    user_agent: str,
) -> _Options:
    """The fleet options from parsed *args*; a bad one ends in ``parser.error``."""
    try:
        targets = [parse_target(text) for text in args.discover]
        for target in targets:
            check_available(target)
        resolve_every = parse_duration(args.resolve_every)
    except (DiscoveryError, ValueError) as error:
        parser.error(str(error))
    if resolve_every <= 0:
        parser.error("--resolve-every must be greater than zero")
    if not 0 < args.max_replicas <= _MAX_REPLICAS_CEILING:
        parser.error(f"--max-replicas must be between 1 and {_MAX_REPLICAS_CEILING}")
    names = [t.host for t in targets if t.dns]
    # The replicas are addresses; their certificate names the service, as grpc verifies
    # a dns: target against its name.
    server_name = args.tls_server_name or (names[0] if names else "")
    connection = Connection(
        addr="",
        user_agent=user_agent,
        connect_timeout=timeout,
        tls=args.tls or args.tls_no_verify,
        tls_no_verify=args.tls_no_verify,
        tls_ca_cert=args.tls_ca_cert,
        tls_client_cert=args.tls_client_cert,
        tls_client_key=args.tls_client_key,
        tls_server_name=server_name,
    )
    try:
        # Read the TLS files now, to fail with a one-line message before anything runs.
        dataclasses.replace(connection, addr="localhost:1", tls_no_verify=False).channel_arguments()
    except OSError as error:
        parser.error(f"cannot use the TLS files: {error}")
    return _Options(
        targets=targets,
        connection=connection,
        metadata=(("authorization", f"Bearer {token}"),) if token else None,
        timeout=timeout,
        max_replicas=args.max_replicas,
        resolve_every=resolve_every,
    )


def _channel_factory(connection: Connection) -> Callable[[str], grpc.aio.Channel]:
    """A new channel per call; the arguments (and a --tls-no-verify relay) once per address."""
    import grpc  # noqa: PLC0415

    made: dict[str, tuple[str, grpc.ChannelCredentials | None, list[tuple[str, Any]]]] = {}

    def channel_for(address: str) -> grpc.aio.Channel:
        if address not in made:
            made[address] = dataclasses.replace(connection, addr=address).channel_arguments()
        target, credentials, options = made[address]
        options = [
            *options,
            ("grpc.initial_reconnect_backoff_ms", _RETRY_FIRST_MS),
            ("grpc.min_reconnect_backoff_ms", _RETRY_FIRST_MS),
            ("grpc.max_reconnect_backoff_ms", _RETRY_MAX_MS),
        ]
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    return channel_for


def _fleet(options: _Options, on_event: Callable[[FleetEvent], None]) -> Fleet:
    from petsage_grpc.fleet._follower import Fleet  # noqa: PLC0415

    return Fleet(
        options.targets,
        channel_for=_channel_factory(options.connection),
        metadata=options.metadata,
        timeout=options.timeout,
        on_event=on_event,
        max_replicas=options.max_replicas,
        resolve_every=options.resolve_every,
    )


def _now(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def _print_event(event: FleetEvent, out: TextIO, as_json: bool) -> None:
    if as_json:
        line = json.dumps(
            {"time": _now(event.at), "replica": event.replica, "event": event.kind, **event.fields}
        )
    else:
        text = event.text
        if event.kind == "transition":
            text = text.rpartition(" ")[0] + " " + paint(event.fields["to"], out)
        line = " ".join(part for part in (_now(event.at), event.replica, text) if part)
    print(line, file=out, flush=True)


def _exit_code(replicas: list[dict[str, Any]]) -> int:
    if not replicas or all(r["state"] in ("unreachable", "connecting") for r in replicas):
        return EXIT_CONNECTION_FAILURE
    for replica in replicas:
        if replica["state"] != "up":
            return EXIT_UNHEALTHY
        known = [s for s in replica["names"].values() if s != "SERVICE_UNKNOWN"]
        if any(state != "SERVING" for state in known):
            return EXIT_UNHEALTHY
    return EXIT_SERVING


def print_fleet_table(replicas: list[dict[str, Any]], out: TextIO) -> None:
    """One row per replica: its state, each name's status, the smoke test."""
    names: list[str] = []
    for replica in replicas:
        names.extend(n for n in replica["names"] if n not in names)
    names.sort(key=lambda n: (n.startswith("check."), n))
    header = ["REPLICA", "STATE", *(n or '""' for n in names), "SMOKE TEST"]
    rows = []
    for replica in replicas:
        smoke = replica["smoke_test"] or {}
        rows.append(
            [
                replica["address"],
                replica["state"],
                *(replica["names"].get(n, "-") for n in names),
                smoke.get("status") or smoke.get("error") or "-",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), file=out)
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        for i in range(2, len(cells) - 1):  # the names' statuses, coloured on a terminal
            cells[i] = paint(row[i], out) + cells[i][len(row[i]) :]
        print("  ".join(cells).rstrip(), file=out)
    out.flush()


def _stop_on_signals(fleet: Fleet) -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, fleet.resolve_now)  # resolve on demand
    return stop


def run_status_fleet(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    timeout: float,
    token: str | None,
) -> int:
    """``status --discover``: the table, then (``--watch``) the events until ^C."""
    if args.exit_on_loss:
        parser.error("--exit-on-loss is for one server (--addr), not --discover")
    options = _options(args, parser, timeout=timeout, token=token, user_agent="petsage-grpc-fleet")
    try:
        return asyncio.run(_status_fleet(options, as_json=args.json, watch=args.watch))
    except KeyboardInterrupt:
        return EXIT_UNHEALTHY


async def _status_fleet(options: _Options, *, as_json: bool, watch: bool) -> int:
    out = sys.stdout
    fleet = _fleet(options, lambda event: _print_event(event, out, as_json))
    await fleet.start()
    try:
        for problem in fleet.resolve_errors:
            print(f"error: {problem}", file=sys.stderr)
        replicas = fleet.snapshot()
        if not replicas and not watch:
            print("error: no replica found", file=sys.stderr)
            return EXIT_CONNECTION_FAILURE
        if as_json:
            document = {"replicas": replicas, "not_followed": fleet.not_followed}
            print(json.dumps(document, indent=None if watch else 2), file=out, flush=True)
        else:
            print_fleet_table(replicas, out)
            if fleet.not_followed:
                print(f"\n{fleet.not_followed} more replicas not followed (--max-replicas)")
        if watch:
            await _stop_on_signals(fleet).wait()
        return _exit_code(fleet.snapshot())
    finally:
        await fleet.close()


def run_fleet(argv: Sequence[str]) -> int:
    """Run ``petsage-grpc fleet`` with *argv*: the fleet page; return the exit code."""
    import os  # noqa: PLC0415

    parser = Parser(
        prog="petsage-grpc fleet",
        description="Serve a page that shows every replica behind the targets, live.",
    )
    parser.add_argument(
        "--discover",
        action="append",
        required=True,
        metavar="TARGET",
        help="dns:///NAME:PORT, dns://DNS-SERVER/NAME:PORT or HOST:PORT (repeat for a list)",
    )
    parser.add_argument("--http-port", type=int, required=True, help="the page's port")
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="the page's address (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the events as JSON lines")
    add_fleet_flags(parser)
    add_client_flags(parser)
    args = parser.parse_args(argv)
    timeout, token = client_settings(parser, args)
    if not 0 <= args.http_port < 65536:
        parser.error("--http-port must be between 0 and 65535")
    from petsage_grpc._extras import missing_extra  # noqa: PLC0415

    problem = missing_extra("fleet", feature="petsage-grpc fleet", modules=("aiohttp",))
    if problem is not None:
        parser.error(problem)
    options = _options(args, parser, timeout=timeout, token=token, user_agent="petsage-grpc-fleet")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        return asyncio.run(_serve_page(options, args.http_host, args.http_port, as_json=args.json))
    except KeyboardInterrupt:
        return 0
    except OSError as error:
        print(f"petsage-grpc fleet: error: cannot listen: {error.strerror}", file=sys.stderr)
        return EXIT_INVALID_ARGUMENTS


async def _serve_page(options: _Options, host: str, port: int, *, as_json: bool) -> int:
    from petsage_grpc.fleet._page import FleetPage  # noqa: PLC0415

    out = sys.stdout
    page: FleetPage | None = None

    def on_event(event: FleetEvent) -> None:
        _print_event(event, out, as_json)
        if page is not None:
            page.record(event)

    fleet = _fleet(options, on_event)
    page = FleetPage(fleet, targets=[t.text for t in options.targets])
    stop = _stop_on_signals(fleet)
    await fleet.start(settle=False)
    try:
        bound = await page.start(host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"fleet page on http://{shown}:{bound}/", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await page.stop()
        await fleet.close()
    return 0
