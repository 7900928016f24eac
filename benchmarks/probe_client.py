"""The kubelet model: a new connection for every probe, several probers in parallel.

``python -m benchmarks.probe_client --port N --probers K --seconds S`` prints ``ready``,
waits for a line ``go`` on stdin, runs K probers for S seconds and prints one JSON
object: ``ok``, ``errors`` by kind, ``seconds``, ``cpu_seconds`` and ``latencies_ms``.

Each probe does on the wire what the kubelet's grpc-go client does: dial a new TCP
connection, send the HTTP/2 preface and SETTINGS, wait for the server's SETTINGS, send
one ``grpc.health.v1.Health/Check`` (user agent ``kube-probe/1.31``, ``grpc-timeout``
1 s, the 1 s deadline covering dial and call), read the answer to its end, close the
connection. A probe passes only on HTTP 200, one SERVING message and ``grpc-status: 0``
(the headers are decoded with ``hpack``).

The client speaks HTTP/2 directly instead of using a grpcio channel per probe because
creating, connecting and closing a grpcio channel costs the client about as much CPU as
the server spends answering: with two cores, the client would be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Final

import hpack

USER_AGENT: Final = "kube-probe/1.31"
DEADLINE: Final = 1.0
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SERVING_MESSAGE: Final = b"\x00\x00\x00\x00\x02\x08\x01"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_HEADER: Final = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """Encode one HTTP/2 frame."""
    length = len(payload)
    return _HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream) + payload


def grpc_request(host: str, port: int, path: str, message: bytes, *, timeout: str) -> bytes:
    """The HEADERS and DATA frames of a unary gRPC request on stream 1."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"{host}:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", USER_AGENT),
        ("grpc-timeout", timeout),
    ]
    block = hpack.Encoder().encode(headers)
    body = b"\x00" + struct.pack(">L", len(message)) + message
    return frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, body)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def header_block(kind: int, flags: int, payload: bytes) -> bytes:
    """The header block fragment of a HEADERS frame (padding and priority removed)."""
    if kind != HEADERS:
        return payload
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, end - payload[0]
    if flags & PRIORITY:
        start += 5
    return payload[start:end]


class _Probe(asyncio.Protocol):
    """One probe's connection.

    Preface and SETTINGS, then the request once the server's SETTINGS arrive (as grpc-go
    waits for them), then the answer to its end of stream.
    """

    def __init__(self, request: bytes, done: asyncio.Future[str]) -> None:
        self._request = request
        self._done = done
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._sent = False
        self._decoder = hpack.Decoder()
        self._block = b""
        self._headers: dict[str, str] = {}
        self._message = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("a stream transport is needed")
        self._transport = transport
        transport.write(PREFACE + frame(SETTINGS, 0, 0))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("connection lost")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        offset = 0
        while len(buffer) - offset >= 9:
            high, low, kind, flags, stream = _HEADER.unpack_from(buffer, offset)
            end = offset + 9 + ((high << 8) | low)
            if end > len(buffer):
                break
            self._frame(kind, flags, stream & 0x7FFFFFFF, buffer[offset + 9 : end])
            offset = end
        self._buffer = buffer[offset:]

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self._done.done() or self._transport is None:
            return
        if kind == SETTINGS and not flags & ACK and not self._sent:
            self._sent = True
            self._transport.write(frame(SETTINGS, ACK, 0) + self._request)
        elif kind == GOAWAY:
            self._finish("GOAWAY")
        elif stream == 1 and kind == RST_STREAM:
            self._finish("RST_STREAM")
        elif stream == 1 and kind == DATA:
            self._message += payload
        elif stream == 1 and kind in {HEADERS, CONTINUATION}:
            self._block += header_block(kind, flags, payload)
            if flags & END_HEADERS:
                self._headers.update(
                    (_text(k), _text(v)) for k, v in self._decoder.decode(self._block)
                )
                self._block = b""
        if stream == 1 and flags & END_STREAM and kind in {DATA, HEADERS}:
            self._finish(self._outcome())

    def _outcome(self) -> str:
        status = self._headers.get(":status")
        if status != "200":
            return f"HTTP {status}"
        grpc_status = self._headers.get("grpc-status")
        if grpc_status != "0":
            return f"grpc-status {grpc_status}"
        return "OK" if self._message == SERVING_MESSAGE else "not SERVING"

    def _finish(self, outcome: str) -> None:
        if not self._done.done():
            self._done.set_result(outcome)
        if self._transport is not None:
            self._transport.close()


async def probe(host: str, port: int, request: bytes) -> tuple[str, float]:
    """Run one probe with the kubelet's deadline; return the outcome and its latency in ms."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    done: asyncio.Future[str] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(DEADLINE):
            transport, _ = await loop.create_connection(lambda: _Probe(request, done), host, port)
            outcome = await done
    except TimeoutError:
        outcome = "DEADLINE_EXCEEDED"
    except OSError as error:
        outcome = type(error).__name__
    finally:
        if transport is not None:
            transport.close()
    return outcome, (time.perf_counter() - started) * 1000.0


async def _run(port: int, probers: int, seconds: float, service: str) -> dict[str, object]:
    name = service.encode()
    message = b"\x0a" + bytes([len(name)]) + name if name else b""
    request = grpc_request(
        "127.0.0.1", port, "/grpc.health.v1.Health/Check", message, timeout="1000m"
    )
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    cpu_started = time.process_time()
    started = time.perf_counter()
    stop_at = started + seconds

    async def prober() -> None:
        # Bounded by time; the count is a backstop (a probe takes at least a round trip).
        for _ in range(1_000_000):
            if time.perf_counter() >= stop_at:
                return
            outcome, latency = await probe("127.0.0.1", port, request)
            outcomes[outcome] += 1
            if outcome == "OK":
                latencies.append(latency)

    await asyncio.wait_for(
        asyncio.gather(*(prober() for _ in range(probers))), timeout=seconds + 2 * DEADLINE
    )
    ok = outcomes.pop("OK", 0)
    return {
        "ok": ok,
        "errors": dict(outcomes),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "latencies_ms": [round(x, 3) for x in latencies],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Wait for ``go`` on stdin, probe, print the results as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--probers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--service", default="")
    args = parser.parse_args(argv)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    result = asyncio.run(_run(args.port, args.probers, args.seconds, args.service))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
