"""A busy embedded backend: an application method that burns CPU, and a health service beside it.

    python -m benchmarks.busy_app --health petsage --app generic [--probe-listener]

The application's ``petsage.bench.v1.Busy/Work`` burns ``--work-ms`` of CPU per call
(or as many milliseconds as its request says, in digits)
(JSON, validation, templating: ordinary Python work, here a loop on the clock);
``Busy/Block`` blocks the event loop in ``time.sleep`` for the seconds its request holds
(as text), as a wedged backend would. ``--app generic`` registers them as a generic
handler (as ``examples/embed.py`` does); ``--app stub`` also as registered methods (as
generated ``add_*Servicer_to_server`` functions do).

``--health petsage`` embeds :func:`petsage_grpc.add_to_server`, with
``--probe-listener`` also a :class:`petsage_grpc.ProbeListener`; ``--health stock``
embeds grpcio-health-checking's aio ``HealthServicer``. Prints ``serving on
127.0.0.1:PORT`` and ``probe port N`` on stderr; on SIGTERM, a JSON line with the
heartbeat's figures (``{}`` without one) on stdout, then stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import grpc

BUSY_SERVICE: Final = "petsage.bench.v1.Busy"


def _burn(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _handlers(work_seconds: float) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
    async def work(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # A request that is a number of milliseconds burns that long instead.
        _burn(float(request) / 1000 if request.isdigit() else work_seconds)
        return request

    async def block(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        time.sleep(float(request.decode() or "0"))  # noqa: ASYNC251 - the point: a wedged loop
        return b""

    return {
        "Work": grpc.unary_unary_rpc_method_handler(work),
        "Block": grpc.unary_unary_rpc_method_handler(block),
    }


async def _main(args: argparse.Namespace) -> int:
    import petsage_grpc  # noqa: PLC0415 - after argument parsing, as a backend would

    server = grpc.aio.server(options=petsage_grpc.SERVER_OPTIONS)
    handlers = _handlers(args.work_ms / 1000)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BUSY_SERVICE, handlers),))
    if args.app == "stub":
        server.add_registered_method_handlers(BUSY_SERVICE, handlers)
    listener = None
    if args.health == "stock":
        from grpc_health.v1 import _async as health_aio  # noqa: PLC0415
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        for name in ("", "liveness", "readiness"):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    else:
        board = petsage_grpc.add_to_server(server)
        if args.probe_listener:
            listener = petsage_grpc.ProbeListener(
                board,
                host="127.0.0.1",
                port=0,
                stall_seconds=args.stall_seconds,
                shed_lag_seconds=args.shed_lag_seconds,
            )
    port = server.add_insecure_port("127.0.0.1:0")
    if listener is not None:
        await listener.start()
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    print(f"probe port {listener.port if listener else port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    figures: dict[str, Any] = {}
    if listener is not None and listener.heartbeat is not None:
        beat = listener.heartbeat
        figures = {"max_lag_seconds": beat.max_lag_seconds, "stalls": beat.stalls}
    print(json.dumps(figures), flush=True)
    await server.stop(0)
    if listener is not None:
        await listener.stop(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the backend until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.busy_app")
    parser.add_argument("--health", choices=("petsage", "stock"), default="petsage")
    parser.add_argument("--app", choices=("generic", "stub"), default="generic")
    parser.add_argument("--probe-listener", action="store_true")
    parser.add_argument("--stall-seconds", type=float, default=3.0)
    parser.add_argument("--shed-lag-seconds", type=float)
    parser.add_argument("--work-ms", type=float, default=20.0)
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
