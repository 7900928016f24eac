"""A complete backend: its own generated gRPC service beside the PetSage health service.

``petsage.example.v1.VisitService`` (examples/proto/, generated into
examples/example_stubs by scripts/generate_stubs.py) counts pet visits in the replica's
own Redis. Its calls fail UNAVAILABLE while that Redis is down, and a dependency check
on the same Redis takes the replica out of rotation meanwhile. Health, SmokeTest and
reflection come from one ``add_to_server`` call; reflection lists VisitService too, so
grpcurl works as pasted::

    redis-server --port 6379 --save '' &
    python examples/embed.py --port 50061 --http-port 8081 --redis redis://127.0.0.1:6379/0
    grpcurl -plaintext 127.0.0.1:50061 list
    grpcurl -plaintext -d '{"pet": "rex"}' 127.0.0.1:50061 \\
        petsage.example.v1.VisitService/RecordVisit
    grpcurl -plaintext -d '{"service": "readiness"}' 127.0.0.1:50061 grpc.health.v1.Health/Check
    curl -i http://127.0.0.1:8081/readyz

``--probe-port`` serves Health's Check and Watch from a thread of their own (a
``ProbeListener``): point the kubelet's probes there, and they are answered however busy
this server's event loop is, while ``liveness`` turns NOT_SERVING if the loop stops
running altogether (``grpc_health_probe -addr=127.0.0.1:50062 -service=liveness``).

``--http-port`` serves ``/readyz`` and ``/livez`` (200 or 503) for load balancers that
check over HTTP, such as HAProxy (deploy/haproxy.cfg). The embedding API has no HTTP
face of its own, so the example answers those two paths from the status board itself,
with aiohttp (the extra ``http``; the Redis check needs ``redis``:
``pip install "petsage-grpc[redis,http]"``); see docs/embedding.md.

On SIGTERM it stops the way Kubernetes and load balancers expect: readiness turns
NOT_SERVING at once (Watch clients move away immediately, ``/readyz`` answers 503), the
server keeps answering for ``--drain-seconds`` so that HTTP checkers notice, then it
stops with ``--grace-seconds`` for calls in flight. It prints ``listening on
HOST:PORT`` once it listens (then ``probes on HOST:PORT`` with ``--probe-port``);
readiness turns SERVING with the first passing store check.

Exit codes: 0 after a graceful stop; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Final

import grpc
import redis.asyncio
import redis.exceptions
from aiohttp import web
from example_stubs.petsage.example.v1 import visit_service_pb2, visit_service_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import petsage_grpc
from petsage_grpc import Check, CheckError, HealthMonitor, ServingStatus, StatusBoard

VISIT_SERVICE: Final = visit_service_pb2.DESCRIPTOR.services_by_name["VisitService"].full_name
MAX_PET_NAME: Final = 64
STORE_CHECK: Final = "visits-store"
"""The dependency check's name; its health service name is ``check.visits-store``."""
STORE_TIMEOUT: Final = 0.5
"""Bound on one Redis command in an RPC: a stalled store answers UNAVAILABLE, not late."""
STORE_CONNECTIONS: Final = 32
"""Redis connections per replica; an RPC waits at most STORE_TIMEOUT for one."""


class VisitService(visit_service_pb2_grpc.VisitServiceServicer):
    """Counts visits per pet in Redis."""

    def __init__(self, store: redis.asyncio.Redis, replica: str) -> None:
        self._store = store
        self._replica = replica

    async def RecordVisit(  # noqa: N802 - the generated servicer's method name
        self,
        request: visit_service_pb2.RecordVisitRequest,
        context: grpc.aio.ServicerContext[
            visit_service_pb2.RecordVisitRequest, visit_service_pb2.RecordVisitResponse
        ],
    ) -> visit_service_pb2.RecordVisitResponse:
        if not 1 <= len(request.pet) <= MAX_PET_NAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"pet must be 1-{MAX_PET_NAME} characters"
            )
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                visits = await self._store.incr(f"visits:{request.pet}")
        except (redis.exceptions.RedisError, OSError, TimeoutError) as error:
            if isinstance(error, redis.exceptions.ConnectionError | OSError):
                # Idle pooled connections to a store that went away are dead too: drop
                # them now, or each one fails a call after the store is back.
                await self._store.connection_pool.disconnect(inuse_connections=False)
            # A fixed message: the store's address and error stay in this process.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "visit store unavailable")
        return visit_service_pb2.RecordVisitResponse(
            pet=request.pet, visits=int(visits), replica=self._replica
        )


# No version in any answer, errors included (aiohttp's default Server header names
# Python's and aiohttp's).
HTTP_HEADERS: Final = {"Server": "petsage-example", "Cache-Control": "no-store"}


class QuietRequestHandler(web.RequestHandler):
    """aiohttp's connection handler; its answers to malformed requests echo nothing back."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp would log a traceback and the bytes received: one line is enough.
        self.logger.warning("bad HTTP request: %s", type(exc).__name__ if exc else status)
        response = web.Response(status=status, text=f"{status}\n", headers=HTTP_HEADERS)
        response.force_close()
        return response


class QuietServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)


async def start_http(board: StatusBoard, host: str, port: int) -> web.ServerRunner:
    """Serve ``GET /readyz`` and ``GET /livez`` (200 or 503) from *board* on *host*:*port*."""
    probes = {"/readyz": petsage_grpc.READINESS, "/livez": petsage_grpc.LIVENESS}

    async def answer(request: web.BaseRequest) -> web.Response:
        name = probes.get(request.path)
        if name is None or request.method not in {"GET", "HEAD"}:
            return web.Response(status=404, text="404\n", headers=HTTP_HEADERS)
        ok = board.get(name) is ServingStatus.SERVING
        text = f"{request.path.strip('/')} {'ok' if ok else 'failed'}\n"
        return web.Response(status=200 if ok else 503, text=text, headers=HTTP_HEADERS)

    # Probes send one short request line and a few headers, and no body.
    server = QuietServer(answer, max_line_size=1024, max_field_size=1024)
    runner = web.ServerRunner(server, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def main(arguments: argparse.Namespace, store_check: Check) -> None:
    store = redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            arguments.redis,
            max_connections=STORE_CONNECTIONS,
            timeout=STORE_TIMEOUT,
            socket_timeout=STORE_TIMEOUT,
            socket_connect_timeout=STORE_TIMEOUT,
            # Fail fast: the client (or the load balancer) retries on another replica.
            retry=Retry(NoBackoff(), 0),
        ),
    )
    server = grpc.aio.server(options=petsage_grpc.SERVER_OPTIONS)
    visit_service_pb2_grpc.add_VisitServiceServicer_to_server(
        VisitService(store, arguments.replica), server
    )
    board = petsage_grpc.add_to_server(server, reflected_services=[VISIT_SERVICE])
    bound = server.add_insecure_port(f"{arguments.host}:{arguments.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    probes = None
    if arguments.probe_port is not None:
        probes = petsage_grpc.ProbeListener(board, host=arguments.host, port=arguments.probe_port)
    async with HealthMonitor(board, [store_check]), contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.aclose)
        if probes is not None:
            await probes.start()  # on this loop, before the server: its heartbeat watches it
        await server.start()
        if arguments.http_port is not None:
            http = await start_http(board, arguments.host, arguments.http_port)
            stack.push_async_callback(http.cleanup)
        print(f"listening on {arguments.host}:{bound}", flush=True)
        if probes is not None:
            print(f"probes on {arguments.host}:{probes.port}", flush=True)
        await stop.wait()
        await petsage_grpc.graceful_stop(
            server,
            board,
            drain_seconds=arguments.drain_seconds,
            grace_seconds=arguments.grace_seconds,
            probe_listener=probes,  # stopped last: probes are answered until the end
        )


def parse_arguments() -> tuple[argparse.Namespace, Check]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50061, help="gRPC port (0: any free one)")
    parser.add_argument("--http-port", type=int, help="serve /readyz and /livez on this port")
    parser.add_argument(
        "--probe-port", type=int, help="serve Check and Watch for the kubelet on this port"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="the visit store")
    parser.add_argument("--replica", default="", help="name returned in every answer")
    parser.add_argument(
        "--check-interval", type=float, default=0.25, help="seconds between store checks"
    )
    parser.add_argument(
        "--failure-threshold",
        type=int,
        default=2,
        help="failed store checks in a row that take the replica out of rotation",
    )
    parser.add_argument("--drain-seconds", type=float, default=2.0)
    parser.add_argument("--grace-seconds", type=float, default=2.0)
    arguments = parser.parse_args()
    try:
        # Readiness follows the store: a replica whose Redis is down leaves the rotation.
        store_check = Check(
            name=STORE_CHECK,
            kind="redis",
            target=arguments.redis,
            interval=arguments.check_interval,
            timeout=min(STORE_TIMEOUT, arguments.check_interval),
            failure_threshold=arguments.failure_threshold,
        )
    except CheckError as error:
        parser.error(str(error))
    return arguments, store_check


if __name__ == "__main__":
    asyncio.run(main(*parse_arguments()))
