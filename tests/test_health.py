"""grpc.health.v1.Health (Check, Watch, List) against a real in-process server, via grpcio."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import grpc
import pytest
from conftest import InProcessServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc import (
    LIVENESS,
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    HealthLimits,
    ServingStatus,
)

SERVING = ServingStatus.SERVING
NOT_SERVING = ServingStatus.NOT_SERVING
UNKNOWN = ServingStatus.UNKNOWN
SERVICE_UNKNOWN = ServingStatus.SERVICE_UNKNOWN

RPC_TIMEOUT: Final = 5.0
WATCH_TIMEOUT: Final = 60.0
STEP_TIMEOUT: Final = 30.0
"""Bound on waiting for something asynchronous (generous: the machine is shared)."""

CheckRequest = health_pb2.HealthCheckRequest
CheckResponse = health_pb2.HealthCheckResponse


@dataclass(frozen=True)
class Health:
    """The generated Health stub's methods, typed."""

    check: grpc.UnaryUnaryMultiCallable[CheckRequest, CheckResponse]
    watch: grpc.UnaryStreamMultiCallable[CheckRequest, CheckResponse]
    list: grpc.UnaryUnaryMultiCallable[health_pb2.HealthListRequest, health_pb2.HealthListResponse]

    @classmethod
    def on(cls, channel: grpc.Channel) -> Health:
        stub = health_pb2_grpc.HealthStub(channel)
        return cls(check=stub.Check, watch=stub.Watch, list=stub.List)

    def status(self, service: str) -> ServingStatus:
        """Check *service* and return its status (raises grpc.RpcError on failure)."""
        return ServingStatus(self.check(CheckRequest(service=service), timeout=RPC_TIMEOUT).status)

    def statuses(self) -> dict[str, ServingStatus]:
        response = self.list(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT)
        return {name: ServingStatus(entry.status) for name, entry in response.statuses.items()}


@contextmanager
def open_channel(address: str, **kwargs: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address, **kwargs) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    """Poll *predicate* until it holds, failing after *timeout*; the assertion is the predicate."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


class _End:
    """Marks the end of a Watch stream in a WatchStream's queue."""


_END: Final = _End()


class WatchStream:
    """A Watch call whose messages a background thread moves into a queue.

    Every read is bounded: a missing message fails the test instead of hanging it.
    """

    def __init__(self, call: grpc._CallIterator[CheckResponse]) -> None:
        self.call = call
        self._queue: queue.Queue[CheckResponse | _End] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, name="watch-reader", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for response in self.call:
                self._queue.put(response)
        except grpc.RpcError:
            pass  # the call's code() tells how it ended
        finally:
            self._queue.put(_END)

    def next(self, timeout: float = STEP_TIMEOUT) -> ServingStatus:
        """The next status on the stream."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no Watch message within {timeout}s")
        if isinstance(item, _End):
            pytest.fail(f"Watch ended ({self.call.code()}: {self.call.details()})")
        return ServingStatus(item.status)

    def end(self, timeout: float = STEP_TIMEOUT) -> grpc.StatusCode:
        """Wait for the stream to end with no further message, and return its status code."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"Watch did not end within {timeout}s")
        assert isinstance(item, _End), f"unexpected message {item} instead of the end"
        self._thread.join(timeout)
        return self.call.code()

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(STEP_TIMEOUT)
        assert not self._thread.is_alive()


@pytest.fixture
def health(channel: grpc.Channel) -> Health:
    return Health.on(channel)


@pytest.fixture
def open_watch(health: Health) -> Iterator[Callable[[str], WatchStream]]:
    """Open Watch streams on the default server; all are cancelled at teardown."""
    streams: list[WatchStream] = []

    def watch(service: str) -> WatchStream:
        stream = WatchStream(health.watch(CheckRequest(service=service), timeout=WATCH_TIMEOUT))
        streams.append(stream)
        return stream

    yield watch
    for stream in streams:
        stream.cancel()


# -- Check ----------------------------------------------------------------------


@pytest.mark.parametrize("service", [OVERALL, LIVENESS, READINESS, SMOKE_TEST_SERVICE])
def test_check_known_names_serving(health: Health, service: str) -> None:
    response = health.check(CheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert response.status == CheckResponse.SERVING


def test_check_default_request_is_the_whole_server(health: Health) -> None:
    response = health.check(CheckRequest(), timeout=RPC_TIMEOUT)
    assert response.status == CheckResponse.SERVING


def test_check_follows_the_board(server: InProcessServer, health: Health) -> None:
    server.board.set(READINESS, NOT_SERVING)
    assert health.status(READINESS) is NOT_SERVING
    assert health.status(LIVENESS) is SERVING
    server.board.set("petsage.v1.Orders", SERVING)
    assert health.status("petsage.v1.Orders") is SERVING
    server.board.set("petsage.v1.Orders", UNKNOWN)
    assert health.status("petsage.v1.Orders") is UNKNOWN

    server.board.drain()
    assert health.status(LIVENESS) is SERVING
    for name in (OVERALL, READINESS, SMOKE_TEST_SERVICE, "petsage.v1.Orders"):
        assert health.status(name) is NOT_SERVING
    server.board.resume()
    assert health.status(OVERALL) is SERVING
    assert health.status(READINESS) is NOT_SERVING  # what was set before the drain


@pytest.mark.parametrize(
    "service", ["petsage.v1.Nope", "Readiness", "readiness ", "grpc.health.v1.Health"]
)
def test_check_unknown_name_is_not_found(health: Health, service: str) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        health.check(CheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND


def test_check_cleared_name_is_not_found(server: InProcessServer, health: Health) -> None:
    server.board.set("petsage.v1.Orders", SERVING)
    assert health.status("petsage.v1.Orders") is SERVING
    server.board.clear("petsage.v1.Orders")
    with pytest.raises(grpc.RpcError) as failure:
        health.status("petsage.v1.Orders")
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND


MALFORMED: Final = {
    "invalid-utf8": b"\x0a\x05\xff\xfe\xfd\xfc\xfb",
    "truncated": b"\x0a\x05ab",
    "bad-tag": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_check_malformed_request_is_invalid_argument_and_server_keeps_answering(
    channel: grpc.Channel, health: Health, body: bytes
) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/grpc.health.v1.Health/Check"
    )
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as failure:
            raw(body, timeout=RPC_TIMEOUT)
        assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert health.status(OVERALL) is SERVING
    # The raw path itself works for a well-formed body.
    answer = raw(CheckRequest(service=READINESS).SerializeToString(), timeout=RPC_TIMEOUT)
    assert CheckResponse.FromString(answer).status == CheckResponse.SERVING


def test_watch_malformed_request_is_invalid_argument(channel: grpc.Channel, health: Health) -> None:
    raw: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        "/grpc.health.v1.Health/Watch"
    )
    call = raw(MALFORMED["invalid-utf8"], timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as failure:
        next(call)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert health.status(READINESS) is SERVING


def test_list_malformed_request_is_invalid_argument(channel: grpc.Channel, health: Health) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/grpc.health.v1.Health/List"
    )
    with pytest.raises(grpc.RpcError) as failure:
        raw(MALFORMED["truncated"], timeout=RPC_TIMEOUT)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert READINESS in health.statuses()


# -- Watch ----------------------------------------------------------------------


def test_watch_current_status_at_once_then_only_changes(
    server: InProcessServer, open_watch: Callable[[str], WatchStream]
) -> None:
    stream = open_watch(READINESS)
    assert stream.next() is SERVING

    server.board.set(READINESS, SERVING)  # same status: no message
    server.board.set(READINESS, SERVING)
    server.board.set("petsage.v1.Other", NOT_SERVING)  # another name: no message here
    server.board.set(READINESS, NOT_SERVING)
    assert stream.next() is NOT_SERVING  # the change, with no duplicate SERVING before it

    server.board.set(READINESS, NOT_SERVING)  # same again
    server.board.set(READINESS, UNKNOWN)
    assert stream.next() is UNKNOWN

    server.board.drain()
    assert stream.next() is NOT_SERVING
    server.board.resume()
    assert stream.next() is UNKNOWN
    assert stream.call.is_active()  # still open


def test_watch_overall_name_and_drain(
    server: InProcessServer, open_watch: Callable[[str], WatchStream]
) -> None:
    overall = open_watch(OVERALL)
    liveness = open_watch(LIVENESS)
    assert overall.next() is SERVING
    assert liveness.next() is SERVING
    server.board.drain()
    assert overall.next() is NOT_SERVING
    server.board.shutdown()  # liveness only moves now
    assert liveness.next() is NOT_SERVING
    server.board.resume()
    assert overall.next() is SERVING
    assert liveness.next() is SERVING


def test_watch_unknown_name_stays_open_then_reports_the_real_status(
    server: InProcessServer, open_watch: Callable[[str], WatchStream]
) -> None:
    stream = open_watch("petsage.v1.Later")
    assert stream.next() is SERVICE_UNKNOWN
    wait_until(lambda: server.board.watcher_count == 1, "the watch to be registered")

    server.board.set("petsage.v1.Later", NOT_SERVING)
    assert stream.next() is NOT_SERVING
    server.board.set("petsage.v1.Later", SERVING)
    assert stream.next() is SERVING
    server.board.clear("petsage.v1.Later")
    assert stream.next() is SERVICE_UNKNOWN
    server.board.set("petsage.v1.Later", SERVING)
    assert stream.next() is SERVING


def test_two_watchers_one_cancels_the_other_still_gets_updates(
    server: InProcessServer, open_watch: Callable[[str], WatchStream]
) -> None:
    leaving = open_watch(READINESS)
    staying = open_watch(READINESS)
    assert leaving.next() is SERVING
    assert staying.next() is SERVING
    wait_until(lambda: server.board.watcher_count == 2, "two watchers")

    leaving.cancel()
    assert leaving.call.code() is grpc.StatusCode.CANCELLED
    wait_until(lambda: server.board.watcher_count == 1, "the cancelled watcher to unsubscribe")

    server.board.set(READINESS, NOT_SERVING)
    assert staying.next() is NOT_SERVING
    server.board.set(READINESS, SERVING)
    assert staying.next() is SERVING

    # A newcomer still gets the current status at once.
    newcomer = open_watch(READINESS)
    assert newcomer.next() is SERVING


def _hold_loop(server: InProcessServer) -> tuple[threading.Event, threading.Event]:
    """Keep the server's event loop busy until the returned release event is set.

    While it is held, the server cannot send: every status change lands in the Watch
    streams' mailboxes with no chance to be written, as for a client too slow to read.
    """
    held = threading.Event()
    release = threading.Event()

    async def hold() -> None:
        held.set()
        release.wait(STEP_TIMEOUT * 2)  # blocks the loop on purpose, bounded

    server.submit(hold())
    assert held.wait(STEP_TIMEOUT)
    return held, release


def test_watch_slow_reader_gets_the_latest_not_a_backlog(
    server: InProcessServer, open_watch: Callable[[str], WatchStream]
) -> None:
    stream = open_watch(READINESS)
    assert stream.next() is SERVING

    _, release = _hold_loop(server)
    try:
        for _ in range(500):
            server.board.set(READINESS, NOT_SERVING)
            server.board.set(READINESS, SERVING)
        server.board.set(READINESS, NOT_SERVING)
    finally:
        release.set()

    assert stream.next() is NOT_SERVING  # the final status comes next...
    server.board.set(READINESS, UNKNOWN)
    assert stream.next() is UNKNOWN  # ...and no backlog of older flips follows it


def test_watch_reader_that_falls_behind_never_sees_a_status_twice_in_a_row(
    server: InProcessServer, health: Health
) -> None:
    # A real client that does not read while the statuses flip.
    call = health.watch(CheckRequest(service=READINESS), timeout=WATCH_TIMEOUT)
    try:
        assert ServingStatus(next(call).status) is SERVING
        flips = 500
        for i in range(flips):
            server.board.set(READINESS, NOT_SERVING if i % 2 == 0 else SERVING)
        server.board.set(READINESS, UNKNOWN)  # a final status none of the flips had

        received = [SERVING]
        stream = WatchStream(call)
        while received[-1] is not UNKNOWN:
            received.append(stream.next())
            assert len(received) <= flips + 2, "more messages than status changes"
        assert all(a is not b for a, b in itertools.pairwise(received))

        server.board.clear(READINESS)
        assert stream.next() is SERVICE_UNKNOWN  # nothing stale after the final status
    finally:
        call.cancel()


def test_close_watches_ends_streams_with_ok(
    server: InProcessServer, health: Health, open_watch: Callable[[str], WatchStream]
) -> None:
    streams = [open_watch(READINESS), open_watch(LIVENESS), open_watch("petsage.v1.Unknown")]
    assert [stream.next() for stream in streams] == [SERVING, SERVING, SERVICE_UNKNOWN]
    wait_until(lambda: server.board.watcher_count == 3, "three watchers")

    server.board.close_watches()
    for stream in streams:
        assert stream.end() is grpc.StatusCode.OK
    wait_until(lambda: server.board.watcher_count == 0, "no watchers")

    # Until resume(), a new Watch ends at once with OK and no message.
    refused = open_watch(READINESS)
    assert refused.end() is grpc.StatusCode.OK
    assert health.status(READINESS) is SERVING  # Check is unaffected

    server.board.resume()
    again = open_watch(READINESS)
    assert again.next() is SERVING
    server.board.set(READINESS, NOT_SERVING)
    assert again.next() is NOT_SERVING


def test_close_watches_lets_a_graceful_stop_finish_early(
    server: InProcessServer, open_watch: Callable[[str], WatchStream]
) -> None:
    stream = open_watch(READINESS)
    assert stream.next() is SERVING
    server.board.close_watches()
    started = time.monotonic()
    server.run(server.server.stop(30), timeout=20)
    # The stop did not wait out its 30 s grace for the Watch stream.
    assert time.monotonic() - started < 15
    assert stream.end() is grpc.StatusCode.OK


# -- List -----------------------------------------------------------------------


def test_list_returns_every_status(server: InProcessServer, health: Health) -> None:
    server.board.set("petsage.v1.Orders", NOT_SERVING)
    server.board.set("petsage.v1.Unset", UNKNOWN)
    server.board.set(READINESS, NOT_SERVING)
    expected = server.board.snapshot()
    assert expected["petsage.v1.Orders"] is NOT_SERVING
    assert health.statuses() == expected
    assert {OVERALL, LIVENESS, READINESS, SMOKE_TEST_SERVICE} <= expected.keys()

    server.board.drain()
    listed = health.statuses()
    assert listed[LIVENESS] is SERVING
    assert listed[READINESS] is listed[OVERALL] is listed["petsage.v1.Orders"] is NOT_SERVING
    server.board.clear("petsage.v1.Orders")
    assert "petsage.v1.Orders" not in health.statuses()


def test_list_over_the_cap_is_resource_exhausted(
    start_server: Callable[..., InProcessServer],
) -> None:
    limit = 5
    server = start_server(limits=HealthLimits(list_limit=limit))
    with open_channel(server.address) as channel:
        health = Health.on(channel)
        extra = [f"petsage.v1.Extra{i}" for i in range(limit - len(server.board))]
        for name in extra:
            server.board.set(name, SERVING)
        assert len(server.board) == limit
        assert len(health.statuses()) == limit  # at the cap is fine

        server.board.set("petsage.v1.OneTooMany", NOT_SERVING)
        with pytest.raises(grpc.RpcError) as failure:
            health.statuses()
        assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(limit) in (failure.value.details() or "")
        # Check and Watch are unaffected by the cap.
        assert health.status("petsage.v1.OneTooMany") is NOT_SERVING

        server.board.clear("petsage.v1.OneTooMany")
        assert len(health.statuses()) == limit


def test_list_default_cap_is_100(start_server: Callable[..., InProcessServer]) -> None:
    server = start_server()
    with open_channel(server.address) as channel:
        health = Health.on(channel)
        for i in range(100 - len(server.board)):
            server.board.set(f"petsage.v1.Svc{i:03d}", SERVING)
        assert len(health.statuses()) == 100
        server.board.set("petsage.v1.Svc999", SERVING)
        with pytest.raises(grpc.RpcError) as failure:
            health.statuses()
        assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_limits_must_be_positive() -> None:
    for name in ("list_limit", "max_service_name_length", "max_watch_streams"):
        with pytest.raises(ValueError, match=name):
            HealthLimits(**{name: 0})


# -- compression ----------------------------------------------------------------


@pytest.fixture
def gzip_server(start_server: Callable[..., InProcessServer]) -> InProcessServer:
    """A server whose default is to gzip responses (when the client accepts gzip)."""
    return start_server(compression=grpc.Compression.Gzip)


def test_health_answers_a_gzip_client_of_a_gzip_server(gzip_server: InProcessServer) -> None:
    """Everything still works; test_raw_http2 checks on the wire that no response is compressed."""
    with open_channel(gzip_server.address, compression=grpc.Compression.Gzip) as channel:
        health = Health.on(channel)
        assert health.status(OVERALL) is SERVING
        with pytest.raises(grpc.RpcError) as failure:
            health.status("petsage.v1.Nope")
        assert failure.value.code() is grpc.StatusCode.NOT_FOUND
        assert health.statuses() == gzip_server.board.snapshot()

        stream = WatchStream(
            health.watch(
                CheckRequest(service=READINESS),
                timeout=WATCH_TIMEOUT,
                compression=grpc.Compression.Gzip,
            )
        )
        try:
            assert stream.next() is SERVING
            gzip_server.board.set(READINESS, NOT_SERVING)
            assert stream.next() is NOT_SERVING
        finally:
            stream.cancel()


def test_admit_watch_refuses_new_streams_only(
    start_server: Callable[..., InProcessServer],
) -> None:
    admitting = threading.Event()
    admitting.set()
    server = start_server(admit_watch=admitting.is_set)
    with open_channel(server.address) as channel:
        health = Health.on(channel)
        opened = WatchStream(health.watch(CheckRequest(service=READINESS), timeout=WATCH_TIMEOUT))
        assert opened.next() is SERVING
        admitting.clear()  # e.g. memory above the standalone server's watermark
        refused = WatchStream(health.watch(CheckRequest(service=READINESS), timeout=WATCH_TIMEOUT))
        assert refused.end() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health.status(READINESS) is SERVING  # Check is never refused
        server.board.set(READINESS, NOT_SERVING)
        assert opened.next() is NOT_SERVING  # streams already open keep going
        admitting.set()
        again = WatchStream(health.watch(CheckRequest(service=READINESS), timeout=WATCH_TIMEOUT))
        assert again.next() is NOT_SERVING
        opened.cancel()
        again.cancel()
