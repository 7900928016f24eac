"""``petsage-grpc status``: what a server reports, at a glance, and (with --watch) as it changes.

Exit codes follow the probe's: 0 every service SERVING; 4 some are not; 2 connection
failed or timed out; 3 an RPC failed (List refused, e.g. UNAUTHENTICATED or
UNIMPLEMENTED); 1 bad arguments. With --watch, the code reflects the last states seen
when interrupted; with --watch --exit-on-loss, 5 when the connection was lost.

With --watch, losing the server is news too: one line when it goes (its Watch streams
end, or List gets no answer), a reminder of how long it has been gone at 10 s, 30 s,
1 min, 2 min, 5 min and then every 10 min, and one line when it answers again (followed
by any status that changed meanwhile). Reconnection is retried with backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from petsage_grpc._durations import format_go_duration
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
    EXIT_RPC_FAILURE,
    EXIT_SERVING,
    EXIT_UNHEALTHY,
)

if TYPE_CHECKING:
    import grpc

__all__ = ["run_status"]

_RELIST_SECONDS = 2.0
EXIT_CONNECTION_LOST = 5
"""``status --watch --exit-on-loss``: the server went away while watched."""
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 5.0
_STILL_GONE_AFTER = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_STILL_GONE_EVERY = 600.0
# grpc's own reconnection backoff grows to 2 min by default: a server that is back
# would go unnoticed that long. Bounded here to the retry pace above.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", int(_RETRY_FIRST_SECONDS * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(_RETRY_FIRST_SECONDS * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(_RETRY_MAX_SECONDS * 1000)),
)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="petsage-grpc status",
        description="Show every health service of a server (from List), the SmokeTest answer, "
        "and with --watch each transition as it happens.",
    )
    parser.add_argument(
        "--addr", default="localhost:50051", help="host:port (default: %(default)s)"
    )
    parser.add_argument(
        "--discover",
        action="append",
        metavar="TARGET",
        help="follow a fleet instead: every replica behind dns:///NAME:PORT, "
        "dns://DNS-SERVER/NAME:PORT or HOST:PORT (repeat for a list); see docs/cli.md",
    )
    add_fleet_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--watch", action="store_true", help="then print transitions until ^C")
    parser.add_argument(
        "--exit-on-loss",
        action="store_true",
        help=f"with --watch: exit {EXIT_CONNECTION_LOST} when the connection is lost "
        "(default: say so and keep reconnecting)",
    )
    add_client_flags(parser)
    return parser


def run_status(argv: Sequence[str]) -> int:
    """Run ``petsage-grpc status`` with *argv*; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    timeout, token = client_settings(parser, args)
    if args.exit_on_loss and not args.watch:
        parser.error("--exit-on-loss needs --watch")
    if args.discover:
        from petsage_grpc.cli._fleet_command import run_status_fleet  # noqa: PLC0415

        return run_status_fleet(args, parser, timeout=timeout, token=token)
    connection = Connection(
        addr=args.addr,
        user_agent="petsage-grpc-status",
        connect_timeout=timeout,
        tls=args.tls or args.tls_no_verify,
        tls_no_verify=args.tls_no_verify,
        tls_ca_cert=args.tls_ca_cert,
        tls_client_cert=args.tls_client_cert,
        tls_client_key=args.tls_client_key,
        tls_server_name=args.tls_server_name,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        return asyncio.run(
            _status(
                connection,
                timeout,
                metadata,
                args.json,
                watch=args.watch,
                exit_on_loss=args.exit_on_loss,
            )
        )
    except KeyboardInterrupt:
        return EXIT_UNHEALTHY


async def _status(
    connection: Connection,
    limit: float,
    metadata: tuple[tuple[str, str], ...] | None,
    as_json: bool,
    *,
    watch: bool,
    exit_on_loss: bool,
) -> int:
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2  # noqa: PLC0415

    from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2  # noqa: PLC0415

    out = sys.stdout
    try:
        channel = connection.aio_channel(options=_CHANNEL_OPTIONS if watch else ())
    except OSError as error:
        print(f"error: cannot use the TLS files: {error}", file=sys.stderr)
        return EXIT_INVALID_ARGUMENTS
    async with channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), limit)
        except TimeoutError:
            print(f'timeout: failed to connect service "{connection.addr}"', file=sys.stderr)
            return EXIT_CONNECTION_FAILURE
        list_call = channel.unary_unary(
            "/grpc.health.v1.Health/List",
            request_serializer=health_pb2.HealthListRequest.SerializeToString,
            response_deserializer=health_pb2.HealthListResponse.FromString,
        )
        try:
            listed = await list_call(
                health_pb2.HealthListRequest(), timeout=limit, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            print(f"error: List failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_RPC_FAILURE
        name_of = health_pb2.HealthCheckResponse.ServingStatus.Name
        states = {name: name_of(answer.status) for name, answer in sorted(listed.statuses.items())}
        smoke = await _smoke_test(channel, limit, metadata, smoke_test_service_pb2)
        if as_json:
            print(json.dumps({"services": states, "smoke_test": smoke}, indent=2), file=out)
        else:
            _print_table(states, smoke, out)
        if watch:

            async def list_names() -> list[str]:
                answer = await list_call(
                    health_pb2.HealthListRequest(), timeout=limit, metadata=metadata
                )
                return list(answer.statuses)

            lost = await _watch(
                channel,
                states=states,
                out=out,
                as_json=as_json,
                messages=health_pb2,
                list_names=list_names,
                exit_on_loss=exit_on_loss,
            )
            if lost:
                return EXIT_CONNECTION_LOST
        # A name that went away (a removed check) no longer counts against the server.
        known = [state for state in states.values() if state != "SERVICE_UNKNOWN"]
        return EXIT_SERVING if all(state == "SERVING" for state in known) else EXIT_UNHEALTHY


async def _smoke_test(
    channel: grpc.aio.Channel,
    limit: float,
    metadata: tuple[tuple[str, str], ...] | None,
    messages: Any,
) -> dict[str, Any]:
    import grpc  # noqa: PLC0415

    call = channel.unary_unary(
        "/petsage.v1.SmokeTestService/SmokeTest",
        request_serializer=messages.SmokeTestRequest.SerializeToString,
        response_deserializer=messages.SmokeTestResponse.FromString,
    )
    try:
        answer = await call(messages.SmokeTestRequest(), timeout=limit, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        return {"error": error.code().name, "message": error.details()}
    result: dict[str, Any] = {"status": answer.status, "message": answer.message}
    if answer.checks:
        result["checks"] = {check.name: check.serving for check in answer.checks}
    if answer.HasField("event_loop_lag_seconds"):
        result["event_loop_lag_seconds"] = answer.event_loop_lag_seconds
    return result


def _print_table(states: dict[str, str], smoke: dict[str, Any], out: TextIO) -> None:
    shown = {name or json.dumps(name): state for name, state in states.items()}
    width = max([len("SERVICE"), *(len(name) for name in shown)])
    print(f"{'SERVICE':<{width}}  STATUS", file=out)
    for name, state in shown.items():
        print(f"{name:<{width}}  {paint(state, out)}", file=out)
    if "error" in smoke:
        print(f"\nsmoke test: {smoke['error']}: {smoke['message']}", file=out)
    else:
        print(f"\nsmoke test: {smoke['status']}: {smoke['message']}", file=out)
    if "event_loop_lag_seconds" in smoke:
        print(f"event loop lag: {smoke['event_loop_lag_seconds'] * 1000:.0f} ms", file=out)
    out.flush()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _event(out: TextIO, as_json: bool, text: str, **fields: object) -> None:
    """One line about the connection: *text* after the time, or a JSON object."""
    if as_json:
        print(json.dumps({"time": _now(), **fields}), file=out, flush=True)
    else:
        print(f"{_now()} {text}", file=out, flush=True)


class _Connectivity:
    """Whether the server answers, said once per change, with "still gone" reminders."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self._out, self._as_json = out, as_json
        self._since: float | None = None  # when the connection was lost; None: connected
        self._reminders = 0
        self.pause = _RELIST_SECONDS
        """How long to wait before asking again: the relist period, or the retry backoff."""

    def lost(self, reason: str) -> bool:
        """The server did not answer; return whether this is news (the loss itself)."""
        if self._since is None:
            self._since, self._reminders = time.monotonic(), 0
            self.pause = _RETRY_FIRST_SECONDS
            text = f"connection lost ({reason})"
            _event(self._out, self._as_json, text, event="connection_lost", reason=reason)
            return True
        self.pause = min(self.pause * 2, _RETRY_MAX_SECONDS)
        gone = time.monotonic() - self._since
        if gone >= self._next_reminder():
            self._reminders += 1
            text = f"still unreachable after {_seconds(gone)}"
            _event(self._out, self._as_json, text, event="still_unreachable", seconds=round(gone))
        return False

    def answered(self) -> None:
        """The server answered: say it is back if it was gone."""
        if self._since is not None:
            gone = time.monotonic() - self._since
            text = f"connection back after {_seconds(gone)}"
            _event(self._out, self._as_json, text, event="connection_back", seconds=round(gone))
            self._since = None
        self.pause = _RELIST_SECONDS

    def _next_reminder(self) -> float:
        index, fixed = self._reminders, len(_STILL_GONE_AFTER)
        if index < fixed:
            return _STILL_GONE_AFTER[index]
        return _STILL_GONE_AFTER[-1] + _STILL_GONE_EVERY * (index - fixed + 1)


def _seconds(value: float) -> str:
    return format_go_duration(float(round(value)))


async def _watch(
    channel: grpc.aio.Channel,
    *,
    states: dict[str, str],
    out: TextIO,
    as_json: bool,
    messages: Any,
    list_names: Callable[[], Awaitable[list[str]]],
    exit_on_loss: bool,
) -> bool:
    """Follow every service until SIGINT/SIGTERM, printing one line per transition.

    Returns:
        True when the connection was lost and *exit_on_loss* asked to stop there.
    """
    import grpc  # noqa: PLC0415

    name_of = messages.HealthCheckResponse.ServingStatus.Name
    watch_call = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=messages.HealthCheckRequest.SerializeToString,
        response_deserializer=messages.HealthCheckResponse.FromString,
    )
    # Set when a Watch stream ends: the server may be gone, so ask now, not at the tick.
    ended = asyncio.Event()

    async def follow(name: str) -> None:
        try:
            async for answer in watch_call(messages.HealthCheckRequest(service=name)):
                new = name_of(answer.status)
                old = states.get(name, "SERVICE_UNKNOWN")
                if new == old:
                    continue
                states[name] = new
                shown = name or json.dumps(name)
                _event(
                    out,
                    as_json,
                    f"{shown} {old} -> {paint(new, out)}",
                    service=name,
                    **{"from": old, "to": new},
                )
        except grpc.aio.AioRpcError:
            pass  # the stream ended: the loop below finds out why
        finally:
            ended.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks = {name: asyncio.create_task(follow(name)) for name in states}
    connectivity = _Connectivity(out, as_json)
    lost = False
    while not stop.is_set():
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(ended.wait())]
        await asyncio.wait(waiters, timeout=connectivity.pause, return_when=FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if stop.is_set():
            break
        ended.clear()
        try:
            names = await list_names()
        except grpc.aio.AioRpcError as error:
            gone = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            # Any other error is an answer, if not a kind one: still connected.
            if gone and connectivity.lost(error.code().name) and exit_on_loss:
                lost = True
                break
            continue
        connectivity.answered()
        for name in names:
            # New names (a reloaded configuration), and streams that ended (the
            # server restarted): follow again.
            if name not in tasks or tasks[name].done():
                tasks[name] = asyncio.create_task(follow(name))
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return lost
