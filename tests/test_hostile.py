"""Hostile and broken clients against the CLI server: the server answers, survives, and lets go.

Random request bytes for every method, invalid UTF-8, unknown methods, HTTP/1.1 on the
gRPC port, garbage and truncated HTTP/2 frames, hundreds of idle connections: after
each, the process is alive and Check answers SERVING; after all of them together, its
memory is back near where it started.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Final

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2
from hardening import (
    CHECK,
    LIST,
    METHODS,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
    SMOKE_TEST,
    WATCH,
    Kind,
    Outcome,
    assert_serving,
    call,
    check_request,
    check_status,
    plaintext,
    wait_until,
)

from petsage_grpc import ServingStatus
from petsage_grpc.server._budget import derive_bounds

SpawnServer = Callable[..., ServerProcess]
Code = grpc.StatusCode

IO_TIMEOUT: Final = 30.0
"""Bound on waiting for the server to react on a raw connection."""
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS: Final = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_FRAME: Final = 0x4
MIB: Final = 1024 * 1024


@pytest.fixture
def server(spawn_server: SpawnServer) -> ServerProcess:
    return spawn_server()


# -- random bytes as requests ------------------------------------------------------------

ALLOWED: Final[dict[str, frozenset[Code]]] = {
    # OK: bytes that happen to parse (e.g. only unknown fields); NOT_FOUND: a name parsed.
    CHECK: frozenset({Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT}),
    # OK: a first message came (SERVICE_UNKNOWN for a parsed but unknown name).
    WATCH: frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    LIST: frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    SMOKE_TEST: frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    REFLECTION_V1: frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    REFLECTION_V1ALPHA: frozenset({Code.OK, Code.INVALID_ARGUMENT}),
}
RANDOM_REQUESTS: Final = 120


def random_bodies(seed: int, count: int = RANDOM_REQUESTS) -> list[bytes]:
    """*count* random request bodies of 0 to 600 bytes, the same for the same *seed*."""
    rng = random.Random(seed)  # noqa: S311 - reproducible noise, not secrets
    return [rng.randbytes(rng.randint(0, 600)) for _ in range(count)]


def send_random_requests(address: str, path: str, seed: int) -> list[Outcome]:
    with plaintext(address) as channel:
        return [call(channel, path, body) for body in random_bodies(seed)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(CHECK, id="check"),
        pytest.param(WATCH, id="watch"),
        pytest.param(LIST, id="list"),
        pytest.param(SMOKE_TEST, id="smoke-test"),
        pytest.param(REFLECTION_V1, id="reflection-v1"),
        pytest.param(REFLECTION_V1ALPHA, id="reflection-v1alpha"),
    ],
)
def test_random_bytes_as_the_request_get_a_proper_error(server: ServerProcess, path: str) -> None:
    outcomes = send_random_requests(server.address, path, seed=sum(map(ord, path)))
    unexpected = [o for o in outcomes if o.code not in ALLOWED[path]]
    assert not unexpected, unexpected[:3]
    # Random bytes are mostly not a valid message: the refusals are really exercised.
    assert sum(o.code is Code.INVALID_ARGUMENT for o in outcomes) > RANDOM_REQUESTS // 2
    for outcome in outcomes:
        assert "Error" not in outcome.details, outcome
        assert "Traceback" not in outcome.details, outcome
    assert_serving(server)


@pytest.mark.parametrize("path", [REFLECTION_V1, REFLECTION_V1ALPHA], ids=["v1", "v1alpha"])
def test_random_bytes_to_reflection_do_not_hurt_the_server(
    server: ServerProcess, path: str
) -> None:
    outcomes = send_random_requests(server.address, path, seed=7)
    # Every call ends promptly with a status of its own (no hang, no dropped connection).
    assert not [o for o in outcomes if o.code in {Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE}]
    assert_serving(server)


# -- invalid UTF-8 and unknown methods ---------------------------------------------------

INVALID_UTF8: Final = (
    b"\xff\xfe",  # never valid
    b"\xc0\xaf",  # overlong "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xe2\x82",  # truncated
    b"readiness\x80",  # valid prefix, stray continuation byte
    b"\xf4\x90\x80\x80",  # above U+10FFFF
)


def raw_check_request(name: bytes) -> bytes:
    """HealthCheckRequest{service: *name*} encoded by hand, whatever *name*'s bytes."""
    assert len(name) < 128
    return b"\x0a" + bytes([len(name)]) + name


@pytest.mark.parametrize("path", [CHECK, WATCH], ids=["check", "watch"])
def test_invalid_utf8_service_names_are_invalid_argument(server: ServerProcess, path: str) -> None:
    with plaintext(server.address) as channel:
        for name in INVALID_UTF8:
            outcome = call(channel, path, raw_check_request(name))
            assert outcome.code is Code.INVALID_ARGUMENT, (name, outcome)
        # The same encoding with valid UTF-8 is answered.
        valid = call(channel, path, raw_check_request(b"readiness"))
        assert valid.code is Code.OK
    assert_serving(server)


UNKNOWN_METHODS: Final[tuple[tuple[str, Kind], ...]] = (
    ("/grpc.health.v1.Health/Nope", "unary"),
    ("/grpc.health.v1.Health/check", "unary"),  # names are case-sensitive
    ("/grpc.health.v1.Health/Watch/", "unary"),
    ("/grpc.health.v2.Health/Check", "unary"),
    ("/petsage.v1.SmokeTestService/Other", "unary"),
    ("/no.such.Service/Method", "unary"),
    ("/no.such.Service/Method", "server-stream"),
    ("/no.such.Service/Method", "bidi"),
    ("/grpc.reflection.v1beta.ServerReflection/ServerReflectionInfo", "bidi"),
    ("/", "unary"),
    ("//", "unary"),
)


def test_unknown_methods_and_services_are_unimplemented(server: ServerProcess) -> None:
    with plaintext(server.address) as channel:
        for path, kind in UNKNOWN_METHODS:
            outcome = call(channel, path, b"", kind=kind)
            assert outcome.code is Code.UNIMPLEMENTED, (path, outcome)
    assert_serving(server)


# -- raw bytes on the gRPC port ----------------------------------------------------------


@dataclass
class Exchange:
    """What came back on a raw connection, and how it ended."""

    data: bytes = b""
    ended: str = "open"
    """closed (EOF), reset, or open (still open when we stopped waiting)."""

    @property
    def frame_types(self) -> list[int]:
        types, offset = [], 0
        while offset + 9 <= len(self.data):
            length = int.from_bytes(self.data[offset : offset + 3], "big")
            types.append(self.data[offset + 3])
            offset += 9 + length
        return types


def read_until_closed(sock: socket.socket, timeout: float) -> Exchange:
    """Read what the server sends until it closes the connection or *timeout* passes."""
    exchange = Exchange()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            exchange.ended = "reset"
            break
        if not chunk:
            exchange.ended = "closed"
            break
        exchange.data += chunk
    return exchange


def exchange(port: int, payload: bytes, *, timeout: float = IO_TIMEOUT) -> Exchange:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(payload)
        return read_until_closed(sock, timeout)


HTTP1_REQUESTS: Final = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /grpc.health.v1.Health/Check HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /grpc.health.v1.Health/Check HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\n"
    b"Content-Length: 5\r\n\r\n\x00\x00\x00\x00\x00",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
)


@pytest.mark.parametrize("request_bytes", HTTP1_REQUESTS, ids=["get", "get-path", "post", "h2c"])
def test_http1_request_is_closed_without_an_http1_answer(
    server: ServerProcess, request_bytes: bytes
) -> None:
    answer = exchange(server.port, request_bytes)
    assert answer.ended in {"closed", "reset"}, answer
    assert not answer.data.startswith(b"HTTP/"), answer.data[:80]
    if answer.data:  # at most the server's own HTTP/2 SETTINGS before it gave up
        assert answer.frame_types[0] == SETTINGS_FRAME
    assert_serving(server)


def frame(
    kind: int, flags: int, stream: int, payload: bytes, *, length: int | None = None
) -> bytes:
    """One HTTP/2 frame; *length* may lie about the payload's size."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


AFTER_PREFACE: Final = PREFACE + EMPTY_SETTINGS
NOISE: Final = random.Random(3).randbytes(512)  # noqa: S311 - reproducible noise
GARBAGE: Final = [
    # (id, bytes, whether the server must end the connection)
    ("random-bytes", AFTER_PREFACE + NOISE, True),
    ("frame-larger-than-max", AFTER_PREFACE + frame(0x0, 0, 1, b"abc", length=0xFFFFFF), True),
    ("headers-bad-hpack", AFTER_PREFACE + frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff"), True),
    ("settings-bad-length", AFTER_PREFACE + frame(0x4, 0, 0, b"\x00\x01\x00"), True),
    ("window-update-zero", AFTER_PREFACE + frame(0x8, 0, 0, b"\x00\x00\x00\x00"), True),
    ("bad-preface", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", True),
    ("preface-then-http1", PREFACE + b"GET / HTTP/1.1\r\n\r\n", True),
    ("continuation-without-headers", AFTER_PREFACE + frame(0x9, 0x4, 1, b"\x82"), True),
    ("data-on-stream-0", AFTER_PREFACE + frame(0x0, 0x1, 0, b"hello"), False),
    ("even-stream-id", AFTER_PREFACE + frame(0x1, 0x5, 2, b"\x82"), False),
    ("truncated-frame-header", AFTER_PREFACE + b"\x00\x00\x05\x00", False),
    ("truncated-frame-payload", AFTER_PREFACE + frame(0x0, 0, 1, b"abcdefgh")[:12], False),
    ("unknown-frame-type", AFTER_PREFACE + frame(0xEE, 0, 0, b"whatever"), False),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("payload", "must_close"), [pytest.param(g[1], g[2], id=g[0]) for g in GARBAGE]
)
def test_garbage_and_truncated_frames_after_the_preface(
    server: ServerProcess, payload: bytes, must_close: bool
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(payload)
        # While the broken connection is open, everyone else is answered.
        assert_serving(server)
        answer = read_until_closed(sock, IO_TIMEOUT if must_close else 1.0)
    if must_close:
        assert answer.ended in {"closed", "reset"}, answer
    if answer.data:
        assert answer.frame_types[0] == SETTINGS_FRAME, answer.data[:40]
    assert_serving(server)


# -- gRPC framing errors through a real HTTP/2 client (h2) -------------------------------


@dataclass
class H2Stream:
    """One stream's outcome as seen by the h2 client."""

    grpc_status: str | None = None
    reset: int | None = None
    ended: bool = False
    messages: list[bytes] = field(default_factory=list)


def h2_calls(
    port: int,
    requests: list[tuple[str, list[tuple[str, str]], bytes | None]],
    *,
    timeout: float = IO_TIMEOUT,
) -> list[H2Stream]:
    """Send each (path, extra headers, body or None for headers only) on one connection."""
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    streams: dict[int, H2Stream] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        connection.initiate_connection()
        for path, extra, body in requests:
            stream_id = connection.get_next_available_stream_id()
            streams[stream_id] = H2Stream()
            connection.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":authority", "petsage-test"),
                    (":path", path),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    *extra,
                ],
                end_stream=body is None,
            )
            if body is not None:
                connection.send_data(stream_id, body, end_stream=True)
        sock.sendall(connection.data_to_send())
        deadline = time.monotonic() + timeout
        while not all(s.ended or s.reset is not None for s in streams.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for event in connection.receive_data(data):
                _record(event, streams, connection)
            sock.sendall(connection.data_to_send())
    return [streams[i] for i in sorted(streams)]


def _record(
    event: h2.events.Event, streams: dict[int, H2Stream], connection: h2.connection.H2Connection
) -> None:
    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
        headers = {str(k): str(v) for k, v in event.headers or ()}
        if "grpc-status" in headers and event.stream_id is not None:
            streams[event.stream_id].grpc_status = headers["grpc-status"]
    elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
        streams[event.stream_id].messages.append(event.data or b"")
        connection.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
    elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
        streams[event.stream_id].ended = True
    elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
        streams[event.stream_id].reset = int(event.error_code or 0)


EMPTY_MESSAGE: Final = b"\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("extra", "body"),
    [
        pytest.param([], b"\x01\x00\x00\x00\x03abc", id="compressed-flag-without-encoding"),
        pytest.param([("grpc-encoding", "gzip")], b"\x01\x00\x00\x00\x03abc", id="bad-gzip"),
        pytest.param([("grpc-encoding", "no-such-codec")], b"\x01\x00\x00\x00\x00", id="codec"),
        pytest.param([("grpc-timeout", "soon")], EMPTY_MESSAGE, id="bad-grpc-timeout"),
    ],
)
def test_broken_grpc_framing_gets_an_error_status(
    server: ServerProcess, extra: list[tuple[str, str]], body: bytes
) -> None:
    (stream,) = h2_calls(server.port, [(CHECK, extra, body)])
    assert stream.grpc_status not in {None, "0"} or stream.reset is not None, stream
    assert_serving(server)


def test_calls_that_end_without_a_request_message_are_answered(server: ServerProcess) -> None:
    """Headers-only requests, and requests cut inside their message, get an error status."""
    requests: list[tuple[str, list[tuple[str, str]], bytes | None]] = [
        *((path, [], None) for path in (CHECK, WATCH, LIST, SMOKE_TEST)),
        (CHECK, [], b""),
        (CHECK, [], b"\x00\x00\x00\x00\x10abc"),  # says 16 bytes, brings 3
        (CHECK, [], b"\x00\x00\x00"),  # a cut length prefix
    ]
    streams = h2_calls(server.port, requests, timeout=IO_TIMEOUT)
    # The control: the same connection answers a whole request at once.
    (control,) = h2_calls(server.port, [(CHECK, [], EMPTY_MESSAGE)])
    assert control.grpc_status == "0"
    unanswered = [r[0] for r, s in zip(requests, streams, strict=True) if s.grpc_status is None]
    assert not unanswered, f"no status for {unanswered}"
    assert all(s.grpc_status != "0" for s in streams)


# -- idle and half-open connections ------------------------------------------------------


ATTACKER: Final = "127.0.0.2"
"""The idle connections' address: not the measuring client's (127.0.0.1), as an attacker's
is not the kubelet's. At the default cap per address the server closes this address's
newest connections, and only this address's."""
OVER_CAP: Final = (
    f"gRPC connections over the {derive_bounds(128).max_grpc_connections_per_address}"
    "-per-address cap"
)
"""What the server logs when it closes connections over the default cap per address."""


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """*count* connections from ATTACKER that say nothing, only the preface, or the preface
    then half-close."""
    with ExitStack() as stack:
        sockets: list[socket.socket] = []
        for index in range(count):
            sock = stack.enter_context(
                socket.create_connection(
                    ("127.0.0.1", port), timeout=IO_TIMEOUT, source_address=(ATTACKER, 0)
                )
            )
            # Beyond the cap per address the server may already have closed this one.
            with suppress(OSError):
                if index % 3 == 1:
                    sock.sendall(PREFACE)
                elif index % 3 == 2:
                    sock.sendall(AFTER_PREFACE)
                    sock.shutdown(socket.SHUT_WR)
            sockets.append(sock)
        yield sockets


def test_idle_and_half_open_connections_do_not_block_check(server: ServerProcess) -> None:
    """At the default caps: 200 idle connections from one address, more than its cap."""
    with idle_connections(server.port, 200) as held:
        # The server is not stuck on them: it sends its SETTINGS to those that greeted it
        # (the oldest, within the cap per address).
        for sock in held[1:30:3]:
            sock.settimeout(IO_TIMEOUT)
            header = sock.recv(9)
            assert len(header) >= 4, header
            assert header[3] == SETTINGS_FRAME, header
        # Like the kubelet: from another address, a new connection per probe. The deadline
        # is generous (a Check stuck behind the idle connections would never answer).
        for _ in range(5):
            with plaintext(server.address) as channel:
                assert check_status(channel, "readiness") is ServingStatus.SERVING
        # The default cap was in force: the attacker's connections beyond it were closed.
        wait_until(lambda: OVER_CAP in server.log(), "the connections over the cap to be closed")
    assert_serving(server)


# -- after all of it ---------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """The resident set size of process *pid*, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def everything(server: ServerProcess, *, scale: int) -> None:
    """One round of every attack in this file (*scale* multiplies the repeated ones)."""
    for index, path in enumerate(METHODS):
        for _ in range(scale):
            send_random_requests(server.address, path, seed=index)
    with plaintext(server.address) as channel:
        for name in INVALID_UTF8:
            call(channel, CHECK, raw_check_request(name))
            call(channel, WATCH, raw_check_request(name))
        for path, kind in UNKNOWN_METHODS:
            call(channel, path, b"", kind=kind)
    for _ in range(scale):
        for request_bytes in HTTP1_REQUESTS:
            exchange(server.port, request_bytes)
        for _, payload, must_close in GARBAGE:
            exchange(server.port, payload, timeout=IO_TIMEOUT if must_close else 0.2)
        h2_calls(server.port, [(CHECK, [], b"\x01\x00\x00\x00\x03abc")] * 20)
        with idle_connections(server.port, 200), plaintext(server.address) as channel:
            assert check_status(channel) is ServingStatus.SERVING


def warm_up(server: ServerProcess) -> None:
    """Ordinary traffic, then one small round of every attack, so that lazy allocations are done."""
    with plaintext(server.address) as channel:
        for _ in range(300):
            check_status(channel)
        for path in (WATCH, LIST, SMOKE_TEST, REFLECTION_V1, REFLECTION_V1ALPHA):
            call(channel, path, b"")
    everything(server, scale=1)


@pytest.mark.slow
def test_memory_is_back_near_its_baseline_after_everything(server: ServerProcess) -> None:
    """At the default caps, the shedder awake: the idle connections exceed their cap."""
    warm_up(server)
    baseline = rss_bytes(server.process.pid)
    everything(server, scale=3)
    assert_serving(server)
    limit = baseline + 30 * MIB
    wait_until(
        lambda: rss_bytes(server.process.pid) <= limit,
        f"RSS to return below {limit // MIB} MiB (baseline {baseline // MIB} MiB)",
    )
    assert server.process.poll() is None


@pytest.mark.slow
def test_calls_without_a_request_message_do_not_pin_memory(spawn_server: SpawnServer) -> None:
    """Each call is answered at once, so round after round the server holds nothing more.

    The first round brings the allocator to its working size (glibc keeps freed memory);
    a leak would show as growth over the rounds after it.
    """
    # 1000 calls per connection: within the stream cap per connection, which is the Watch
    # cap per connection plus 20 (beyond it HTTP/2 refuses the stream before any handler
    # runs).
    server = spawn_server("--max-watch-streams-per-connection", "1000")
    warm_up(server)

    def burst() -> int:
        streams = h2_calls(server.port, [(CHECK, [], None)] * 1000, timeout=IO_TIMEOUT)
        return sum(s.grpc_status is not None for s in streams)

    assert burst() == 1000
    baseline = rss_bytes(server.process.pid)
    answered = sum(burst() for _ in range(6))
    assert_serving(server)
    assert answered == 6000
    limit = baseline + 30 * MIB
    wait_until(
        lambda: rss_bytes(server.process.pid) <= limit,
        f"RSS to stay below {limit // MIB} MiB (after the first round {baseline // MIB} MiB)",
    )


def test_check_still_answers_the_reference_request(server: ServerProcess) -> None:
    """A sanity anchor for the raw helpers: a well-formed raw Check is answered SERVING."""
    (stream,) = h2_calls(server.port, [(CHECK, [], EMPTY_MESSAGE)])
    assert stream.grpc_status == "0"
    assert len(stream.messages) >= 1
    body = b"".join(stream.messages)
    assert body[:5] == b"\x00" + struct.pack(">I", len(body) - 5)
    response = health_pb2.HealthCheckResponse.FromString(body[5:])
    assert ServingStatus(response.status) is ServingStatus.SERVING
    assert check_request() == b""
