"""The CLI server's limits: request size, service name length, Watch caps, call bursts.

Each limit keeps one client from holding the health service's resources; each test
shows the limit and that the server keeps answering everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Final

import grpc
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2
from hardening import (
    CHECK,
    LIST,
    RPC_TIMEOUT,
    SMOKE_TEST,
    STEP_TIMEOUT,
    WATCH,
    assert_serving,
    call,
    check_request,
    check_status,
    plaintext,
    wait_until,
)

from petsage_grpc import ServingStatus

SpawnServer = Callable[..., ServerProcess]

MAX_MESSAGE: Final = 16 * 1024
"""grpc.max_receive_message_length in SERVER_OPTIONS."""
WATCH_TIMEOUT: Final = 120.0
"""Bound on a Watch stream held open by a test (it is cancelled long before)."""

SERVING_BYTES: Final = health_pb2.HealthCheckResponse(status="SERVING").SerializeToString()


@pytest.fixture
def server(spawn_server: SpawnServer) -> ServerProcess:
    return spawn_server()


def request_of_size(size: int) -> bytes:
    """A HealthCheckRequest whose serialized form is exactly *size* bytes (size >= 130)."""
    for name_length in range(size, 0, -1):
        body = check_request("x" * name_length)
        if len(body) == size:
            return body
        if len(body) < size:
            break
    raise AssertionError(f"no HealthCheckRequest of exactly {size} bytes")


# -- request size ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [CHECK, WATCH, SMOKE_TEST, LIST], ids=["check", "watch", "smoke-test", "list"]
)
def test_two_mebibyte_request_is_resource_exhausted(server: ServerProcess, path: str) -> None:
    body = check_request("x" * (2 * 1024 * 1024))
    with plaintext(server.address) as channel:
        outcome = call(channel, path, body)
        assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        # The same connection, and a new one, keep being answered.
        assert check_status(channel) is ServingStatus.SERVING
    assert_serving(server)


def test_size_limit_is_16_kib(server: ServerProcess) -> None:
    with plaintext(server.address) as channel:
        at_limit = call(channel, CHECK, request_of_size(MAX_MESSAGE))
        over_limit = call(channel, CHECK, request_of_size(MAX_MESSAGE + 1))
    # At the limit the request is read (and refused for its name); one byte more is not read.
    assert at_limit.code is grpc.StatusCode.INVALID_ARGUMENT, at_limit
    assert over_limit.code is grpc.StatusCode.RESOURCE_EXHAUSTED, over_limit


# -- service name length -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "check_code", "first_watch_status"),
    [
        pytest.param("s" * 256, grpc.StatusCode.NOT_FOUND, ServingStatus.SERVICE_UNKNOWN, id="256"),
        pytest.param("s" * 257, grpc.StatusCode.INVALID_ARGUMENT, None, id="257"),
        pytest.param(
            "é" * 256, grpc.StatusCode.NOT_FOUND, ServingStatus.SERVICE_UNKNOWN, id="256-é"
        ),
        pytest.param("é" * 257, grpc.StatusCode.INVALID_ARGUMENT, None, id="257-é"),
        pytest.param("s" * 5000, grpc.StatusCode.INVALID_ARGUMENT, None, id="5000"),
    ],
)
def test_service_name_length_cap(
    server: ServerProcess,
    name: str,
    check_code: grpc.StatusCode,
    first_watch_status: ServingStatus | None,
) -> None:
    """Names are capped at 256 characters (not bytes): longer ones are INVALID_ARGUMENT."""
    with plaintext(server.address) as channel:
        checked = call(channel, CHECK, check_request(name))
        watched = call(channel, WATCH, check_request(name))
    assert checked.code is check_code, checked
    if first_watch_status is None:
        assert watched.code is grpc.StatusCode.INVALID_ARGUMENT, watched
        assert "256" in watched.details
    else:
        assert watched.code is grpc.StatusCode.OK, watched
        status = health_pb2.HealthCheckResponse.FromString(watched.messages[0]).status
        assert ServingStatus(status) is first_watch_status


# -- Watch caps --------------------------------------------------------------------------


class Watches:
    """Watch streams held open on named connections, each its own TCP connection."""

    def __init__(self, address: str, stack: ExitStack) -> None:
        self._address = address
        self._stack = stack
        self._channels: dict[str, grpc.Channel] = {}
        self.open: dict[str, list[grpc.Call]] = {}

    def channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            self._channels[name] = self._stack.enter_context(plaintext(self._address))
            self.open[name] = []
        return self._channels[name]

    def start(self, name: str, service: str = "") -> grpc.StatusCode:
        """Open a Watch on connection *name*; OK once its first message came, else the code."""
        method: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.channel(name).unary_stream(WATCH)
        responses = method(check_request(service), timeout=WATCH_TIMEOUT)
        try:
            first = next(responses)
        except grpc.RpcError as error:
            return error.code()
        assert first == SERVING_BYTES
        self.open[name].append(responses)
        return grpc.StatusCode.OK

    def close(self, name: str, count: int | None = None) -> None:
        """Cancel *count* (default: all) of connection *name*'s open streams."""
        streams = self.open[name]
        count = len(streams) if count is None else count
        for stream in streams[:count]:
            stream.cancel()
        del streams[:count]

    def close_all(self) -> None:
        for name in self.open:
            self.close(name)


@pytest.fixture
def watches(spawn_server: SpawnServer) -> Iterator[Watches]:
    server = spawn_server("--max-watch-streams", "5", "--max-watch-streams-per-connection", "3")
    with ExitStack() as stack:
        held = Watches(server.address, stack)
        stack.callback(held.close_all)
        yield held


def accepted_again(watches: Watches, name: str) -> Callable[[], bool]:
    """A predicate: a new Watch on *name* is accepted (rejections hold nothing)."""
    return lambda: watches.start(name) is grpc.StatusCode.OK


def test_watch_caps_per_connection_and_in_all(watches: Watches) -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(3):
        assert watches.start("a") is grpc.StatusCode.OK
    assert watches.start("a") is exhausted  # the 4th on one connection
    assert watches.start("a", "readiness") is exhausted  # whatever the name
    assert watches.start("b") is grpc.StatusCode.OK
    assert watches.start("b", "liveness") is grpc.StatusCode.OK  # 5 in all now
    assert watches.start("b") is exhausted
    assert watches.start("c") is exhausted
    # Check, List and SmokeTest are not Watch streams: unaffected.
    channel = watches.channel("c")
    assert check_status(channel) is ServingStatus.SERVING
    assert call(channel, LIST, b"").code is grpc.StatusCode.OK
    assert call(channel, SMOKE_TEST, b"").code is grpc.StatusCode.OK


def test_closed_watch_streams_free_their_places(watches: Watches) -> None:
    for name in ("a", "a", "a", "b", "b"):
        assert watches.start(name) is grpc.StatusCode.OK
    assert watches.start("c") is grpc.StatusCode.RESOURCE_EXHAUSTED

    watches.close("a", 1)
    wait_until(accepted_again(watches, "c"), "a place in all after one stream closed")
    assert watches.start("c") is grpc.StatusCode.RESOURCE_EXHAUSTED

    watches.close_all()
    # Every place is free again: 3 on one connection, 2 on another.
    for _ in range(3):
        wait_until(accepted_again(watches, "a"), "a place on connection a")
    assert watches.start("a") is grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(2):
        wait_until(accepted_again(watches, "d"), "a place on connection d")
    assert watches.start("d") is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_watch_caps_from_environment_variables(spawn_server: SpawnServer) -> None:
    server = spawn_server(
        env={
            "PETSAGE_GRPC_MAX_WATCH_STREAMS": "3",
            "PETSAGE_GRPC_MAX_WATCH_STREAMS_PER_CONNECTION": "2",
        }
    )
    with ExitStack() as stack:
        held = Watches(server.address, stack)
        stack.callback(held.close_all)
        assert [held.start("a") for _ in range(3)] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ]
        assert [held.start("b") for _ in range(2)] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ]


# -- a burst of Watch calls --------------------------------------------------------------

BURST: Final = 3000
BURST_CHANNELS: Final = 10
"""300 streams each: under the cap per connection of a 256 MiB budget (307)."""


async def _burst(address: str) -> list[bytes | str]:
    """Open BURST Watch calls at once; return each one's first message (or how it failed)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(BURST_CHANNELS)]
    calls: list[grpc.aio.UnaryStreamCall[bytes, bytes]] = []
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), RPC_TIMEOUT)
        for index in range(BURST):
            method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channels[
                index % BURST_CHANNELS
            ].unary_stream(WATCH)
            calls.append(method(check_request(), timeout=WATCH_TIMEOUT))

        async def first(stream: grpc.aio.UnaryStreamCall[bytes, bytes]) -> bytes | str:
            try:
                message = await stream.read()
            except grpc.RpcError as error:
                return f"{error.code().name}: {error.details()}"
            return message if isinstance(message, bytes) else "EOF"

        return await asyncio.wait_for(asyncio.gather(*(first(c) for c in calls)), STEP_TIMEOUT * 3)
    finally:
        for stream in calls:
            stream.cancel()
        for channel in channels:
            await channel.close()


@pytest.mark.slow
def test_burst_of_3000_watch_calls_is_all_accepted(spawn_server: SpawnServer) -> None:
    """The pending-request limits let a reconnect storm queue, not fail, with a budget
    sized for it (256 MiB holds 4,915 Watch streams; the default 128 MiB, 1,638)."""
    server = spawn_server("--memory-budget", "256")
    firsts = asyncio.run(_burst(server.address))
    failures = [each for each in firsts if each != SERVING_BYTES]
    assert not failures, f"{len(failures)} of {BURST} failed, e.g. {failures[:3]}"
    assert len(firsts) == BURST
    assert_serving(server)
