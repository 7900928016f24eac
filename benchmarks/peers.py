"""The Python servers the benchmarks compare, one per process.

``python -m benchmarks.peers KIND [--port N]`` logs ``serving on 127.0.0.1:N`` on stderr
(as ``petsage-grpc serve`` does) and serves until SIGTERM. Kinds:

- ``stock-sync``: grpcio-health-checking's sync ``HealthServicer`` on ``grpc.server``
  with a ``ThreadPoolExecutor`` (the way its documentation runs it);
- ``stock-aio``: grpcio-health-checking's ``grpc_health.v1._async.HealthServicer`` on
  ``grpc.aio.server()``;
- ``bare-aio``: the floor of what grpcio can do for Check: a generic handler on
  ``grpc.aio.server`` that takes the raw request and returns pre-serialized bytes;
- ``bare-stream``: the floor for Watch: a streaming handler that sends SERVING, waits on
  its own ``asyncio.Event`` and sends NOT_SERVING when it is set;
- ``bare-stream-ss``: the same handler registered as stream-stream (it reads its one
  request with ``context.read()``), as petsage-grpc registers Watch since 84c7ad8;
- ``petsage-embedded``: this project embedded the documented way (``add_to_server`` and
  ``SERVER_OPTIONS``), for the Watch fan-out, where the change is triggered in-process.

For ``python -m benchmarks.ab``, which takes a Check throughput gap apart:

- ``bare-su``: the bare Check registered client-streaming, as petsage-grpc registers it:
  it reads its one request with ``context.read()`` and exempts its answer from
  compression, then returns the pre-serialized bytes;
- ``petsage-registered``: ``petsage-embedded`` with every service also registered
  through ``add_registered_method_handlers``, as generated stubs do (and petsage-grpc did
  before 4cffa6a).

Every kind knows ``""`` and ``readiness`` as SERVING. A line ``flip`` on stdin sets both
to NOT_SERVING, right after printing ``flipped <time.monotonic()>`` on stdout (the
clients compare their own ``time.monotonic()``, the same clock on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from concurrent import futures
from typing import Any, Final

import grpc

HEALTH: Final = "grpc.health.v1.Health"
SERVING: Final = b"\x08\x01"
NOT_SERVING: Final = b"\x08\x02"
FLIPPED_NAMES: Final = ("", "readiness")
_OPTIONS: list[str] = ["[]"]
KINDS: Final = (
    "stock-sync",
    "stock-aio",
    "bare-aio",
    "bare-stream",
    "bare-stream-ss",
    "petsage-embedded",
    "bare-su",
    "petsage-registered",
)


def _announce(port: int) -> None:
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)


def _flipped() -> None:
    print(f"flipped {time.monotonic():.6f}", flush=True)


def _bare_options() -> Sequence[tuple[str, Any]]:
    """The server options for the bare handlers: petsage-grpc's, given as ``--options``.

    So grpc core's defaults (such as its pending-call limit) never set them apart.
    """
    return tuple((str(k), v) for k, v in json.loads(_OPTIONS[0]))


def _stdin_lines(loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None]) -> None:
    """Hand each stdin line to *on_line* on *loop*, from a daemon thread (EOF: stop reading)."""

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(on_line, line.strip())

    threading.Thread(target=read, name="stdin", daemon=True).start()


async def _serve_aio(server: grpc.aio.Server, port: int, flip: Callable[[], Any]) -> None:
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[Any]] = set()

    def on_line(line: str) -> None:
        if line == "flip":
            _flipped()
            result = flip()
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                pending.add(task)
                task.add_done_callback(pending.discard)

    _stdin_lines(loop, on_line)
    _announce(bound)
    await server.wait_for_termination()


async def _stock_aio(port: int) -> None:
    from grpc_health.v1 import _async as health_aio  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    servicer = health_aio.HealthServicer()
    await servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    async def flip() -> None:
        for name in FLIPPED_NAMES:
            await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    await _serve_aio(server, port, flip)


async def _serve_bare_check(port: int, check: grpc.RpcMethodHandler[bytes, bytes]) -> None:
    server = grpc.aio.server(options=_bare_options())
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(HEALTH, {"Check": check}),)
    )
    await _serve_aio(server, port, lambda: None)


async def _bare_aio(port: int) -> None:
    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return SERVING

    await _serve_bare_check(port, grpc.unary_unary_rpc_method_handler(check))


async def _bare_su(port: int) -> None:
    async def check(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.read()
        context.disable_next_message_compression()
        return SERVING

    await _serve_bare_check(port, grpc.stream_unary_rpc_method_handler(check))


async def _bare_stream(port: int, *, stream_stream: bool = False) -> None:
    waiting: set[asyncio.Event] = set()
    status = [SERVING]

    async def watch(
        request: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        if stream_stream:
            await context.read()  # the one request message
        event = asyncio.Event()
        waiting.add(event)
        try:
            yield status[0]
            await event.wait()
            yield status[0]
            await asyncio.Event().wait()  # hold the stream until the client leaves
        finally:
            waiting.discard(event)

    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return status[0]

    def flip() -> None:
        status[0] = NOT_SERVING
        for event in list(waiting):
            event.set()

    server = grpc.aio.server(options=_bare_options())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                HEALTH,
                {
                    "Check": grpc.unary_unary_rpc_method_handler(check),
                    "Watch": (
                        grpc.stream_stream_rpc_method_handler(watch)
                        if stream_stream
                        else grpc.unary_stream_rpc_method_handler(watch)
                    ),
                },
            ),
        )
    )
    await _serve_aio(server, port, flip)


async def _petsage(port: int, *, registered: bool = False) -> None:
    import petsage_grpc  # noqa: PLC0415

    server = grpc.aio.server(options=petsage_grpc.SERVER_OPTIONS)
    if registered:
        add_generic = server.add_generic_rpc_handlers

        def add_both(handlers: Iterable[grpc.GenericRpcHandler]) -> None:
            add_generic(handlers)
            for handler in handlers:
                # grpcio's DictionaryGenericHandler; its method map has no public name.
                methods = handler._method_handlers  # type: ignore[attr-defined]
                server.add_registered_method_handlers(handler.service_name(), methods)  # type: ignore[attr-defined]

        server.add_generic_rpc_handlers = add_both  # type: ignore[method-assign,assignment]
    board = petsage_grpc.add_to_server(server)

    def flip() -> None:
        for name in FLIPPED_NAMES:
            board.set(name, petsage_grpc.ServingStatus.NOT_SERVING)

    await _serve_aio(server, port, flip)


def _stock_sync(port: int) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: PLC0415

    servicer = health.HealthServicer()
    servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    _announce(bound)
    for line in sys.stdin:
        if line.strip() == "flip":
            _flipped()
            for name in FLIPPED_NAMES:
                servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one peer server until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--options", default="[]", help="grpc server options for the bare kinds, as JSON pairs"
    )
    args = parser.parse_args(argv)
    _OPTIONS[0] = args.options
    if args.kind == "stock-sync":
        _stock_sync(args.port)
        return 0
    runners: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {
        "stock-aio": _stock_aio,
        "bare-aio": _bare_aio,
        "bare-stream": _bare_stream,
        "bare-stream-ss": functools.partial(_bare_stream, stream_stream=True),
        "petsage-embedded": _petsage,
        "bare-su": _bare_su,
        "petsage-registered": functools.partial(_petsage, registered=True),
    }
    asyncio.run(runners[args.kind](args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
