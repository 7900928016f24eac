"""Graceful stop of ``petsage-grpc serve``: drain, end Watch streams, stop within bounds.

On SIGTERM (or SIGINT) the server reports readiness and "" NOT_SERVING at once while
liveness stays SERVING, keeps answering for --drain-seconds, then ends every Watch stream
with OK, gives calls in flight --grace-seconds, and exits 0. The whole stop must take no
more than drain + grace + 1 s after the signal. A second signal cuts it short.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2
from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from petsage_grpc import LIVENESS, OVERALL, READINESS, ServingStatus

SpawnServer = Callable[..., ServerProcess]

DRAIN: Final = 1.0
GRACE: Final = 1.0
READINESS_WATCHERS: Final = 100
STEP_TIMEOUT: Final = 30.0
"""Bound on any single wait for the server; the real waits are far shorter."""
CHECK: Final = "/grpc.health.v1.Health/Check"
WATCH: Final = "/grpc.health.v1.Health/Watch"
STATUS_CHANGE: Final = re.compile(r"service '([^']*)': (\w+) -> (\w+)$")

SERVING = ServingStatus.SERVING
NOT_SERVING = ServingStatus.NOT_SERVING


def request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def wait_for_log(server: ServerProcess, text: str, timeout: float = STEP_TIMEOUT) -> str:
    """The server's log once it contains *text* (the reader thread may lag the exit)."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not logged within {timeout}s:\n{server.log()}")
        time.sleep(0.01)
    return server.log()


def stopped_log(server: ServerProcess) -> list[str]:
    """The complete log of a server that has exited: every line up to "stopped"."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not re.search(r"\bstopped\"?\}?\n\Z", server.log()):
        if time.monotonic() > deadline:
            pytest.fail(f"the log does not end with 'stopped':\n{server.log()}")
        time.sleep(0.01)
    return server.log().splitlines()


@dataclass
class Health:
    """The typed Check and Watch callables of a grpc.aio channel."""

    channel: grpc.aio.Channel

    def check(self, service: str) -> grpc.aio.UnaryUnaryCall[Any, Any]:
        call = self.channel.unary_unary(
            CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return call(request(service), timeout=STEP_TIMEOUT)

    async def status(self, service: str) -> ServingStatus:
        response = await self.check(service)
        assert isinstance(response, health_pb2.HealthCheckResponse)
        return ServingStatus(response.status)

    def watch(self, service: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
        call = self.channel.unary_stream(
            WATCH,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return call(request(service), timeout=60)


def check_once(address: str, service: str) -> ServingStatus:
    """One blocking Check; an answer also shows that the server's event loop is running."""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return ServingStatus(check(request(service), timeout=STEP_TIMEOUT).status)


async def next_status(call: grpc.aio.UnaryStreamCall[Any, Any]) -> ServingStatus | None:
    """The next status a Watch sends, or None when the stream has ended."""
    message = await asyncio.wait_for(call.read(), STEP_TIMEOUT)
    if message is grpc.aio.EOF:
        return None
    assert isinstance(message, health_pb2.HealthCheckResponse)
    return ServingStatus(message.status)


@dataclass
class Follower:
    """Reads one Watch stream to its end, noting each status, the final code and when."""

    call: grpc.aio.UnaryStreamCall[Any, Any]
    statuses: list[ServingStatus] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    code: grpc.StatusCode | None = None
    ended_at: float = 0.0

    async def follow(self) -> None:
        while (status := await next_status(self.call)) is not None:
            self.statuses.append(status)
            self.changed.set()
        self.code = await self.call.code()
        self.ended_at = time.monotonic()


@dataclass
class Observed:
    signalled_at: float
    drained: list[Follower]
    """The readiness watchers, then the "" watcher."""
    liveness: Follower
    during_drain: dict[str, ServingStatus]
    checked_at: float


async def watch_through_stop(server: ServerProcess, signum: int) -> Observed:
    """Watch readiness (many times), "" and liveness while *server* stops on *signum*."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), STEP_TIMEOUT)
        health = Health(channel)
        calls = [health.watch(READINESS) for _ in range(READINESS_WATCHERS)]
        calls += [health.watch(OVERALL), health.watch(LIVENESS)]
        first = await asyncio.gather(*(next_status(call) for call in calls))
        assert first == [SERVING] * len(calls)

        signalled_at = time.monotonic()
        server.signal(signum)

        followers = [Follower(call) for call in calls]
        tasks = [asyncio.ensure_future(follower.follow()) for follower in followers]
        drained, liveness = followers[:-1], followers[-1]
        await asyncio.wait_for(
            asyncio.gather(*(follower.changed.wait() for follower in drained)), STEP_TIMEOUT
        )
        # Still draining: Check answers too, with the same statuses.
        during_drain = {
            service: await health.status(service) for service in (LIVENESS, READINESS, OVERALL)
        }
        checked_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), DRAIN + GRACE + STEP_TIMEOUT)
        return Observed(signalled_at, drained, liveness, during_drain, checked_at)


def status_changes(lines: list[str]) -> list[tuple[str, str, str]]:
    return [
        (match[1], match[2], match[3]) for line in lines if (match := STATUS_CHANGE.search(line))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop(spawn_server: SpawnServer, signum: int) -> None:
    server = spawn_server("--drain-seconds", str(DRAIN), "--grace-seconds", str(GRACE))

    observed = asyncio.run(watch_through_stop(server, signum))
    code = server.wait(DRAIN + GRACE + STEP_TIMEOUT)
    exited_after = time.monotonic() - observed.signalled_at

    # Readiness and "" watchers heard NOT_SERVING once, then their streams ended with OK.
    for follower in observed.drained:
        assert follower.statuses == [NOT_SERVING]
        assert follower.code is grpc.StatusCode.OK
    # The liveness watcher heard nothing new: liveness stayed SERVING to the end.
    assert observed.liveness.statuses == []
    assert observed.liveness.code is grpc.StatusCode.OK
    assert observed.during_drain == {
        LIVENESS: SERVING,
        READINESS: NOT_SERVING,
        OVERALL: NOT_SERVING,
    }
    # The streams stayed open for the whole drain, and the Check calls were answered in it.
    ends = [follower.ended_at for follower in [*observed.drained, observed.liveness]]
    assert min(ends) - observed.signalled_at >= DRAIN * 0.9
    assert observed.checked_at < min(ends)
    # The product requirement: exit 0 within drain + grace + 1 s of the signal.
    assert code == 0
    assert exited_after <= DRAIN + GRACE + 1.0, exited_after

    lines = stopped_log(server)
    name = signal.Signals(signum).name
    assert sum(f"{name} received" in line for line in lines) == 1
    assert f"ending {READINESS_WATCHERS + 2} watch stream(s)" in server.log()
    assert lines[-1].endswith("stopped")
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line]
    changes = status_changes(lines)
    assert len(changes) == len(set(changes)), changes  # one line per change
    for service in (OVERALL, READINESS):
        assert (service, "SERVING", "NOT_SERVING") in changes
    # liveness changes only once the server has stopped serving, never during the drain.
    ending = next(i for i, line in enumerate(lines) if "watch stream(s)" in line)
    for i, line in enumerate(lines):
        if "service 'liveness'" in line:
            assert i > ending, lines


def test_second_signal_cuts_a_long_drain_short(spawn_server: SpawnServer) -> None:
    server = spawn_server("--drain-seconds", "30", "--grace-seconds", "30")

    async def scenario() -> tuple[float, Follower]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), STEP_TIMEOUT)
            call = Health(channel).watch(READINESS)
            assert await next_status(call) is SERVING
            signalled_at = time.monotonic()
            server.signal(signal.SIGTERM)
            follower = Follower(call)
            task = asyncio.ensure_future(follower.follow())
            await asyncio.wait_for(follower.changed.wait(), STEP_TIMEOUT)
            assert follower.statuses == [NOT_SERVING]  # draining now
            server.signal(signal.SIGTERM)
            await asyncio.wait_for(task, STEP_TIMEOUT)
            return signalled_at, follower

    signalled_at, follower = asyncio.run(scenario())
    code = server.wait(STEP_TIMEOUT)
    elapsed = time.monotonic() - signalled_at

    assert code == 0
    assert elapsed < 5.0, elapsed  # not the 30 s drain, nor the 30 s grace
    assert follower.code is grpc.StatusCode.OK
    lines = stopped_log(server)
    assert any("SIGTERM again" in line for line in lines), lines


def test_json_log_through_a_stop(spawn_server: SpawnServer) -> None:
    server = spawn_server(
        "--log-format", "json", "--drain-seconds", "0.2", "--grace-seconds", "0.2"
    )

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), STEP_TIMEOUT)
            call = Health(channel).watch(READINESS)
            assert await next_status(call) is SERVING
            server.signal(signal.SIGTERM)
            follower = Follower(call)
            await asyncio.wait_for(follower.follow(), STEP_TIMEOUT)
            assert follower.statuses == [NOT_SERVING]

    asyncio.run(scenario())
    assert server.wait(STEP_TIMEOUT) == 0
    lines = stopped_log(server)

    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["level"] in {"debug", "info", "warning", "error"}
    changes = [entry for entry in entries if " -> " in entry["message"]]
    assert changes
    for entry in changes:
        assert {"service", "status"} <= entry.keys(), entry
        assert entry["message"].endswith(f"-> {entry['status']}")
    assert {(e["service"], e["status"]) for e in changes} >= {
        (READINESS, "NOT_SERVING"),
        (OVERALL, "NOT_SERVING"),
    }
    assert entries[0]["port"] == server.port
    assert entries[-1]["message"] == "stopped"


# -- a call in flight when the drain ends ---------------------------------------------


PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class RawHttp2Call:
    """One gRPC call on a hand-driven HTTP/2 connection (stream 1), every wait bounded.

    Built from frames rather than h2's state machine, which refuses frames that follow
    a GOAWAY: here the call must keep going after the server's GOAWAY.
    """

    sock: socket.socket
    encoder: Encoder = field(default_factory=Encoder)
    decoder: Decoder = field(default_factory=Decoder)
    buffer: bytes = b""
    frames: int = 0
    goaway: bool = False
    headers: list[dict[str, str]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None

    @classmethod
    def open(cls, port: int, path: str) -> RawHttp2Call:
        """Connect and send the request headers, but not the request message yet."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
        call = cls(sock)
        headers = HeadersFrame(1)
        headers.data = call.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "petsage"),
                (":path", path),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        headers.flags.add("END_HEADERS")
        sock.sendall(PREFACE + SettingsFrame(0).serialize() + headers.serialize())
        return call

    def send_message(self, payload: bytes) -> None:
        data = DataFrame(1)
        data.data = struct.pack(">BI", 0, len(payload)) + payload
        data.flags.add("END_STREAM")
        self.sock.sendall(data.serialize())

    def read_until(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {what}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                pytest.fail(f"connection closed while waiting for {what}")
            self.buffer += chunk
            self._parse()

    def _parse(self) -> None:
        while len(self.buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
            if len(self.buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
            self.buffer = self.buffer[9 + length :]
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        self.frames += 1
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            pong = PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"])
            self.sock.sendall(pong.serialize())
        elif isinstance(frame, GoAwayFrame):
            self.goaway = True
        elif frame.stream_id != 1:
            return
        elif isinstance(frame, HeadersFrame):
            self.headers.append({str(k): str(v) for k, v in self.decoder.decode(frame.data)})
            self.ended = self.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, DataFrame):
            self.body += frame.data
            self.ended = self.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, RstStreamFrame):
            self.reset = frame.error_code
            self.ended = True

    def close(self) -> None:
        self.sock.close()


def test_call_in_flight_when_the_drain_ends_completes(spawn_server: SpawnServer) -> None:
    grace = 5.0
    server = spawn_server("--drain-seconds", str(DRAIN), "--grace-seconds", str(grace))
    assert check_once(server.address, LIVENESS) is SERVING  # the server handles signals now
    # The call starts before the signal; its request message is still to come.
    call = RawHttp2Call.open(server.port, CHECK)
    try:
        call.read_until(lambda: call.frames > 0, "the server's settings")
        signalled_at = time.monotonic()
        server.signal(signal.SIGTERM)
        wait_for_log(server, "draining")

        # GOAWAY marks the end of the drain: the server is stopping, in its grace period.
        call.read_until(lambda: call.goaway, "GOAWAY")
        goaway_after = time.monotonic() - signalled_at
        payload = health_pb2.HealthCheckRequest(service=LIVENESS).SerializeToString()
        call.send_message(payload)
        call.read_until(lambda: call.ended, "the response")
    finally:
        call.close()
    code = server.wait(STEP_TIMEOUT)
    exited_after = time.monotonic() - signalled_at

    assert goaway_after >= DRAIN * 0.9, "GOAWAY during the drain"
    assert call.reset is None
    assert call.headers[0][":status"] == "200"
    assert call.headers[-1]["grpc-status"] == "0"
    flag, length = struct.unpack(">BI", call.body[:5])
    assert (flag, length) == (0, len(call.body) - 5)
    response = health_pb2.HealthCheckResponse.FromString(call.body[5:])
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert code == 0
    # Once the call is done and its connection closed, the stop does not wait out the grace.
    assert exited_after < DRAIN + grace, exited_after


@pytest.mark.slow
def test_sigterm_right_after_start_still_stops_gracefully(spawn_server: SpawnServer) -> None:
    # spawn_server returns as soon as "serving on" is logged; signal at once, repeatedly.
    # (Signal handlers installed after that line let 3 SIGTERMs in 4 kill the server.)
    for attempt in range(20):
        server = spawn_server("--drain-seconds", "0", "--grace-seconds", "0")
        server.signal(signal.SIGTERM)
        code = server.wait(STEP_TIMEOUT)
        assert code == 0, f"attempt {attempt}: exit code {code}, log:\n{server.log()}"
