"""``petsage-grpc status``: what a server reports, at a glance, and (with --watch) as it changes.

Exit codes follow the probe's: 0 every service SERVING; 4 some are not; 2 connection
failed or timed out; 3 an RPC failed (List refused, e.g. UNAUTHENTICATED or
UNIMPLEMENTED); 1 bad arguments. With --watch, the code reflects the last states seen
when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from petsage_grpc._durations import parse_duration
from petsage_grpc.cli._client import Connection
from petsage_grpc.cli._probe import (
    EXIT_CONNECTION_FAILURE,
    EXIT_INVALID_ARGUMENTS,
    EXIT_RPC_FAILURE,
    EXIT_SERVING,
    EXIT_UNHEALTHY,
)
from petsage_grpc.services._auth import BearerToken

if TYPE_CHECKING:
    import grpc

__all__ = ["run_status"]

_TOKEN_ENV = "PETSAGE_GRPC_AUTH_TOKEN_FILE"  # noqa: S105 - a variable name
_COLOURS = {"SERVING": "\033[32m", "NOT_SERVING": "\033[31m"}
_OTHER_COLOUR = "\033[33m"
_RESET = "\033[0m"
_RELIST_SECONDS = 2.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_INVALID_ARGUMENTS, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="petsage-grpc status",
        description="Show every health service of a server (from List), the SmokeTest answer, "
        "and with --watch each transition as it happens.",
    )
    parser.add_argument(
        "--addr", default="localhost:50051", help="host:port (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--watch", action="store_true", help="then print transitions until ^C")
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
    return parser


def run_status(argv: Sequence[str]) -> int:
    """Run ``petsage-grpc status`` with *argv*; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        timeout = parse_duration(args.timeout)
        token = BearerToken.read_file(args.token_file) if args.token_file else None
    except ValueError as error:
        parser.error(str(error))
    if timeout <= 0:
        parser.error("--timeout must be greater than zero")
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
        return asyncio.run(_status(connection, timeout, metadata, args.json, args.watch))
    except KeyboardInterrupt:
        return EXIT_UNHEALTHY


async def _status(
    connection: Connection,
    limit: float,
    metadata: tuple[tuple[str, str], ...] | None,
    as_json: bool,
    watch: bool,
) -> int:
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2  # noqa: PLC0415

    from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2  # noqa: PLC0415

    out = sys.stdout
    try:
        channel = connection.aio_channel()
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

            await _watch(
                channel,
                states=states,
                out=out,
                as_json=as_json,
                messages=health_pb2,
                list_names=list_names,
            )
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


def _paint(state: str, out: TextIO) -> str:
    if not out.isatty() or os.environ.get("NO_COLOR"):
        return state
    return f"{_COLOURS.get(state, _OTHER_COLOUR)}{state}{_RESET}"


def _print_table(states: dict[str, str], smoke: dict[str, Any], out: TextIO) -> None:
    shown = {name or json.dumps(name): state for name, state in states.items()}
    width = max([len("SERVICE"), *(len(name) for name in shown)])
    print(f"{'SERVICE':<{width}}  STATUS", file=out)
    for name, state in shown.items():
        print(f"{name:<{width}}  {_paint(state, out)}", file=out)
    if "error" in smoke:
        print(f"\nsmoke test: {smoke['error']}: {smoke['message']}", file=out)
    else:
        print(f"\nsmoke test: {smoke['status']}: {smoke['message']}", file=out)
    if "event_loop_lag_seconds" in smoke:
        print(f"event loop lag: {smoke['event_loop_lag_seconds'] * 1000:.0f} ms", file=out)
    out.flush()


async def _watch(
    channel: grpc.aio.Channel,
    *,
    states: dict[str, str],
    out: TextIO,
    as_json: bool,
    messages: Any,
    list_names: Callable[[], Awaitable[list[str]]],
) -> None:
    """Follow every service until SIGINT/SIGTERM, printing one line per transition."""
    import grpc  # noqa: PLC0415

    name_of = messages.HealthCheckResponse.ServingStatus.Name
    watch_call = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=messages.HealthCheckRequest.SerializeToString,
        response_deserializer=messages.HealthCheckResponse.FromString,
    )

    async def follow(name: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for answer in watch_call(messages.HealthCheckRequest(service=name)):
                new = name_of(answer.status)
                old = states.get(name, "SERVICE_UNKNOWN")
                if new == old:
                    continue
                states[name] = new
                now = datetime.now(UTC).isoformat(timespec="milliseconds")
                if as_json:
                    line = json.dumps({"time": now, "service": name, "from": old, "to": new})
                else:
                    shown = name or json.dumps(name)
                    line = f"{now} {shown} {old} -> {_paint(new, out)}"
                print(line, file=out, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks = {name: asyncio.create_task(follow(name)) for name in states}
    while not stop.is_set():
        # Names added later (a reloaded configuration) are found by listing again.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _RELIST_SECONDS)
        with contextlib.suppress(grpc.aio.AioRpcError):
            for name in await list_names():
                # New names, and streams that ended (the server restarted): follow again.
                if name not in tasks or tasks[name].done():
                    tasks[name] = asyncio.create_task(follow(name))
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
