"""Helpers shared by the TLS, auth, limits and hostile-client tests: raw calls, ports, polling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2
from tcp_listener import free_port

from petsage_grpc import ServingStatus

RPC_TIMEOUT: Final = 10.0
"""Bound on one call that is expected to answer at once (generous: the machine is shared)."""
STEP_TIMEOUT: Final = 30.0
"""Bound on polling for something that happens asynchronously."""
PROCESS_TIMEOUT: Final = 60.0
"""Bound on one short-lived subprocess (a probe, a server that should refuse to start)."""

CHECK: Final = "/grpc.health.v1.Health/Check"
WATCH: Final = "/grpc.health.v1.Health/Watch"
LIST: Final = "/grpc.health.v1.Health/List"
SMOKE_TEST: Final = "/petsage.v1.SmokeTestService/SmokeTest"
REFLECTION_V1: Final = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_V1ALPHA: Final = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

Kind = Literal["unary", "server-stream", "bidi"]
"""How a method is called: unary, server streaming (Watch) or bidirectional (reflection)."""

METHODS: Final[dict[str, Kind]] = {
    CHECK: "unary",
    WATCH: "server-stream",
    LIST: "unary",
    SMOKE_TEST: "unary",
    REFLECTION_V1: "bidi",
    REFLECTION_V1ALPHA: "bidi",
}

Metadata = tuple[tuple[str, str | bytes], ...]


def refuses_connections(port: int) -> bool:
    """Whether a connection to 127.0.0.1:*port* is refused (nothing listens there)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    """Poll *predicate* until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def check_request(service: str = "") -> bytes:
    """A serialized HealthCheckRequest for *service*."""
    return health_pb2.HealthCheckRequest(service=service).SerializeToString()


@dataclass(frozen=True)
class Outcome:
    """How one raw call ended: its status code, details and the messages received."""

    code: grpc.StatusCode
    details: str
    messages: tuple[bytes, ...]


def call(
    channel: grpc.Channel,
    path: str,
    body: bytes,
    *,
    kind: Kind | None = None,
    metadata: Metadata | None = None,
    timeout: float = RPC_TIMEOUT,
) -> Outcome:
    """Call *path* with the raw request *body* and return how it ended.

    A server-streaming call ends after its first message (then it is cancelled), which
    counts as OK: a Watch never ends by itself.
    """
    kind = kind or METHODS.get(path, "unary")
    try:
        if kind == "unary":
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            return Outcome(
                grpc.StatusCode.OK, "", (unary(body, timeout=timeout, metadata=metadata),)
            )
        if kind == "server-stream":
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            responses = stream(body, timeout=timeout, metadata=metadata)
            try:
                first = next(responses)
            finally:
                responses.cancel()
            return Outcome(grpc.StatusCode.OK, "", (first,))
        bidi: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
        received = tuple(bidi(iter([body]), timeout=timeout, metadata=metadata))
        return Outcome(grpc.StatusCode.OK, "", received)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", ())


def check_status(channel: grpc.Channel, service: str = "", **kwargs: Any) -> ServingStatus:
    """Check *service* and return its status; fail the test on an error."""
    outcome = call(channel, CHECK, check_request(service), **kwargs)
    assert outcome.code is grpc.StatusCode.OK, outcome
    return ServingStatus(health_pb2.HealthCheckResponse.FromString(outcome.messages[0]).status)


@contextmanager
def plaintext(address: str, *, own_connection: bool = True) -> Iterator[grpc.Channel]:
    """A blocking channel to *address* on its own TCP connection (no shared subchannel)."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    with grpc.insecure_channel(address, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
        yield channel


def assert_serving(server: ServerProcess) -> None:
    """The server process is alive and a fresh connection's Check answers SERVING."""
    assert server.process.poll() is None, f"the server exited:\n{server.log()}"
    with plaintext(server.address) as channel:
        assert check_status(channel) is ServingStatus.SERVING


@dataclass(frozen=True)
class Exited:
    """A command that ran to completion."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: str, env: dict[str, str] | None = None) -> Exited:
    """Run ``python -m petsage_grpc *args`` to completion (bounded) and return what it did."""
    done = subprocess.run(
        [sys.executable, "-m", "petsage_grpc", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return Exited(done.returncode, done.stdout, done.stderr)


def serve_refused(*args: str, env: dict[str, str] | None = None) -> tuple[Exited, int]:
    """Run ``serve`` on a free loopback port with *args*, expecting it to refuse to start.

    Returns what it did and the port it was given, so that a test can show nothing
    listens there.
    """
    port = free_port()
    done = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), *args, env=env)
    return done, port
