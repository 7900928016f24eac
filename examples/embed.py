"""Embed the PetSage health service in your own grpc.aio server.

A PetSage backend adds Health, SmokeTest and reflection with one call, reports its own
state on the returned board, and stops the way Kubernetes expects on SIGTERM.

    python examples/embed.py --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

import petsage_grpc
from petsage_grpc import ServingStatus

# The backend's own service. A real backend registers generated servicers here; a raw
# echo handler keeps the example free of another .proto file.
ECHO_SERVICE = "petsage.example.v1.EchoService"


async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def warm_up() -> None:
    """Stand-in for opening connection pools and filling caches."""
    await asyncio.sleep(0.1)


async def main(port: int) -> None:
    server = grpc.aio.server(options=petsage_grpc.SERVER_OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    board = petsage_grpc.add_to_server(server)

    # Not ready for traffic until warmed up; alive all along.
    for name in (petsage_grpc.READINESS, petsage_grpc.OVERALL, ECHO_SERVICE):
        board.set(name, ServingStatus.NOT_SERVING)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await warm_up()
    for name in (petsage_grpc.READINESS, petsage_grpc.OVERALL, ECHO_SERVICE):
        board.set(name, ServingStatus.SERVING)
    print(f"listening on 127.0.0.1:{bound}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await petsage_grpc.graceful_stop(server, board, drain_seconds=1, grace_seconds=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50061)
    asyncio.run(main(parser.parse_args().port))
