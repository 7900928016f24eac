"""Watch fan-out client: many ``grpc.health.v1.Health/Watch`` streams on ``readiness``.

``python -m benchmarks.watch_client --port N --streams S --channels C [--client raw|grpcio]``
opens S Watch streams spread evenly over C connections and talks to the benchmark over
stdin and stdout, one JSON object per line:

1. once every stream got its first message or failed (or ``--open-timeout`` passed), it
   prints ``{"event": "opened", "opened": n, "errors": {code: n}, "unsettled": n,
   "open_seconds": t}``;
2. on ``held``: ``{"event": "held", "alive": n, "errors": {...}}`` (streams still open);
3. on ``collect DEADLINE`` (a ``time.monotonic()`` value): waits until every open
   stream got its second message or DEADLINE passes, then prints ``{"event": "changed",
   "times": [monotonic receive times], "missing": n, "errors": {...}, "cpu_seconds": t}``;
4. on ``close`` or end of input: closes every connection and exits.

Two clients:

- ``raw`` (the default) speaks HTTP/2 itself on asyncio: per connection, one write opens
  all its streams, and a message costs a frame-header parse. The receive time is when
  the bytes reach the process, so the client adds next to nothing to what is measured.
- ``grpcio``: grpcio aio channels, one ``UnaryStreamCall`` per stream. A message costs
  the client about as much CPU as it costs the server to send, so with one CPU for the
  clients the delivery times are the clients' as much as the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

import grpc
import hpack

from benchmarks.probe_client import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    frame,
    header_block,
)

WATCH: Final = "/grpc.health.v1.Health/Watch"
SERVICE: Final = "readiness"
WINDOW_UPDATE: Final = 8
MAX_CONCURRENT_STREAMS: Final = 3
_HEADER: Final = struct.Struct(">HBBBL")
_STATUS_NAMES: Final = tuple(
    code.name for code in sorted(grpc.StatusCode, key=lambda c: c.value[0])
)
GRPCIO_OPTIONS: Final = (
    ("grpc.use_local_subchannel_pool", 1),  # one connection per channel
    ("grpc.max_receive_message_length", 1024),
)


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class _Stream:
    __slots__ = ("changed_at", "error", "messages", "opened", "pending")

    def __init__(self) -> None:
        self.opened = False
        self.changed_at: float | None = None
        self.error: str | None = None
        self.messages = 0
        self.pending = b""


class _Tracker:
    """Counts streams that settled (first message or failure) and wakes the waiter."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.settled = 0
        self.all_settled = asyncio.Event()

    def settle(self) -> None:
        self.settled += 1
        if self.settled >= self.total:
            self.all_settled.set()


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _request_message() -> bytes:
    name = SERVICE.encode()
    return b"\x0a" + bytes([len(name)]) + name


# -- raw HTTP/2 -----------------------------------------------------------------------


def _request_frames(port: int) -> tuple[bytes, bytes]:
    """A stateless HPACK header block (never-indexed literals) and the request's DATA payload."""
    never = hpack.NeverIndexedHeaderTuple
    block = hpack.Encoder().encode(
        [
            never(":method", "POST"),
            never(":scheme", "http"),
            never(":path", WATCH),
            never(":authority", f"127.0.0.1:{port}"),
            never("content-type", "application/grpc"),
            never("te", "trailers"),
            never("user-agent", "petsage-benchmark-watch"),
        ],
        huffman=False,
    )
    message = _request_message()
    return block, b"\x00" + struct.pack(">L", len(message)) + message


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying many Watch streams."""

    def __init__(
        self, streams: Sequence[_Stream], request: tuple[bytes, bytes], tracker: _Tracker
    ) -> None:
        self._streams = {1 + 2 * i: stream for i, stream in enumerate(streams)}
        self._request = request
        self._tracker = tracker
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._opened = False
        self._decoder = hpack.Decoder()
        self._block = b""
        self._now = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("a stream transport is needed")
        self._transport = transport
        # Our SETTINGS (defaults) and a large connection window: no flow control stalls.
        transport.write(
            PREFACE + frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**30))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in self._streams.values():
            self._fail(stream, "connection lost")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, stream: _Stream, error: str) -> None:
        if stream.error is not None:
            return
        stream.error = error
        if not stream.opened:
            self._tracker.settle()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _open(self, limit: int) -> None:
        self._opened = True
        block, body = self._request
        frames = []
        for number, (stream_id, stream) in enumerate(self._streams.items()):
            if number >= limit:
                self._fail(stream, "over the server's MAX_CONCURRENT_STREAMS")
                continue
            frames.append(frame(HEADERS, END_HEADERS, stream_id, block))
            frames.append(frame(DATA, END_STREAM, stream_id, body))
        self._write(b"".join(frames))

    def data_received(self, data: bytes) -> None:
        self._now = time.monotonic()
        buffer = self._buffer + data if self._buffer else data
        offset = 0
        size = len(buffer)
        while size - offset >= 9:
            high, low, kind, flags, stream_id = _HEADER.unpack_from(buffer, offset)
            end = offset + 9 + ((high << 8) | low)
            if end > size:
                break
            payload = buffer[offset + 9 : end]
            stream_id &= 0x7FFFFFFF
            if kind == DATA:
                stream = self._streams.get(stream_id)
                if stream is not None:
                    self._message_bytes(stream, payload)
            elif kind in {HEADERS, CONTINUATION}:
                self._headers(kind, flags, stream_id, payload)
            else:
                self._control(kind, flags, stream_id, payload)
            offset = end
        self._buffer = buffer[offset:]

    def _headers(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        self._block += header_block(kind, flags, payload)
        if not flags & END_HEADERS:
            return
        headers = {_text(k): _text(v) for k, v in self._decoder.decode(self._block)}
        self._block = b""
        stream = self._streams.get(stream_id)
        if stream is not None and (flags & END_STREAM or "grpc-status" in headers):
            code = int(headers.get("grpc-status", 2))
            name = _STATUS_NAMES[code] if code < len(_STATUS_NAMES) else str(code)
            self._fail(stream, name if not stream.opened else f"ENDED {name}")

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            self._write(frame(SETTINGS, ACK, 0))
            if not self._opened:
                limit = len(self._streams)
                for i in range(0, len(payload) - 5, 6):
                    key, value = struct.unpack_from(">HL", payload, i)
                    if key == MAX_CONCURRENT_STREAMS:
                        limit = min(limit, value)
                self._open(limit)
        elif kind == PING and not flags & ACK:
            self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self._streams.get(stream_id)
            if stream is not None:
                (code,) = struct.unpack(">L", payload[:4])
                self._fail(stream, f"RST_STREAM {code}")
        elif kind == GOAWAY:
            (last,) = struct.unpack(">L", payload[:4])
            for other_id, stream in self._streams.items():
                if other_id > (last & 0x7FFFFFFF):
                    self._fail(stream, "GOAWAY")

    def _message_bytes(self, stream: _Stream, payload: bytes) -> None:
        pending = stream.pending + payload if stream.pending else payload
        for _ in range(64):
            if len(pending) < 5:
                break
            length = int.from_bytes(pending[1:5], "big")
            if len(pending) < 5 + length:
                break
            pending = pending[5 + length :]
            stream.messages += 1
            if stream.messages == 1:
                stream.opened = True
                self._tracker.settle()
            elif stream.messages == 2:
                stream.changed_at = self._now
        stream.pending = pending


async def _open_raw(
    port: int, streams: list[_Stream], connections: int, tracker: _Tracker
) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    request = _request_frames(port)
    protocols: list[_Connection] = []
    for i in range(connections):
        share = streams[i::connections]
        _, protocol = await loop.create_connection(
            lambda share=share: _Connection(share, request, tracker),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
        protocols.append(protocol)

    def close() -> None:
        for protocol in protocols:
            protocol.close()

    return close


# -- grpcio ---------------------------------------------------------------------------


async def _follow(channel: grpc.aio.Channel, stream: _Stream, tracker: _Tracker) -> None:
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(WATCH)
    call = watch(_request_message())
    try:
        first = await call.read()
        if first is grpc.aio.EOF:
            stream.error = "ENDED"
            tracker.settle()
            return
        stream.opened = True
        tracker.settle()
        second = await call.read()
        stream.changed_at = time.monotonic()
        if second is not grpc.aio.EOF:
            await call.read()  # hold the stream until cancelled or ended
        stream.error = "ENDED"
    except grpc.aio.AioRpcError as error:
        if not stream.opened:
            stream.error = error.code().name
            tracker.settle()
        else:
            stream.error = f"ENDED {error.code().name}"
    except asyncio.CancelledError:
        call.cancel()
        raise


async def _open_grpcio(
    port: int, streams: list[_Stream], channels: int, tracker: _Tracker
) -> tuple[list[asyncio.Task[None]], list[grpc.aio.Channel]]:
    target = f"127.0.0.1:{port}"
    opened = [grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) for _ in range(channels)]
    tasks = [
        asyncio.create_task(_follow(opened[i % channels], stream, tracker))
        for i, stream in enumerate(streams)
    ]
    return tasks, opened


# -- the command loop -------------------------------------------------------------------


def _errors(streams: Sequence[_Stream]) -> dict[str, int]:
    return dict(Counter(s.error for s in streams if s.error is not None))


async def _collect(streams: Sequence[_Stream], deadline: float) -> None:
    waiting = [s for s in streams if s.opened]
    for _ in range(100_000):  # polls every 5 ms until the deadline
        if time.monotonic() >= deadline:
            return
        if all(s.changed_at is not None or s.error for s in waiting):
            return
        await asyncio.sleep(0.005)


async def _run(port: int, count: int, connections: int, open_timeout: float, client: str) -> None:
    streams = [_Stream() for _ in range(count)]
    tracker = _Tracker(count)
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    close_raw: Callable[[], None] = lambda: None  # noqa: E731
    if client == "raw":
        close_raw = await _open_raw(port, streams, connections, tracker)
    else:
        tasks, channels = await _open_grpcio(port, streams, connections, tracker)
    try:
        async with asyncio.timeout(open_timeout):
            await tracker.all_settled.wait()
    except TimeoutError:
        pass
    _emit(
        "opened",
        opened=sum(s.opened for s in streams),
        errors=_errors(streams),
        unsettled=sum(not s.opened and s.error is None for s in streams),
        open_seconds=round(time.monotonic() - started, 4),
    )
    loop = asyncio.get_running_loop()
    for _ in range(16):  # a handful of commands; EOF ends it
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "close":
            break
        if line[0] == "held":
            alive = sum(s.opened and s.error is None for s in streams)
            _emit("held", alive=alive, errors=_errors(streams))
        elif line[0] == "collect":
            cpu = time.process_time()
            await _collect(streams, float(line[1]))
            times = [s.changed_at for s in streams if s.opened and s.changed_at is not None]
            _emit(
                "changed",
                times=[round(t, 6) for t in times],
                missing=sum(s.opened for s in streams) - len(times),
                errors=_errors(streams),
                cpu_seconds=round(time.process_time() - cpu, 4),
            )
    close_raw()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(channel.close() for channel in channels))


def main(argv: Sequence[str] | None = None) -> int:
    """Open the streams and follow the commands on stdin."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watch_client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--channels", type=int, default=4, help="connections to spread over")
    parser.add_argument("--open-timeout", type=float, default=60.0)
    parser.add_argument("--client", choices=("raw", "grpcio"), default="raw")
    args = parser.parse_args(argv)
    asyncio.run(_run(args.port, args.streams, args.channels, args.open_timeout, args.client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
