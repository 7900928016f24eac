"""The probe listener: Health's Check and Watch on a port of their own, off the event loop.

Embedded in a backend, the health service shares the application's ``grpc.aio`` event
loop: while the application's own calls keep that loop busy, a probe waits behind them,
and the kubelet restarts a pod that is only busy. The probe listener answers from a
thread of its own running a small HTTP/2 server (``hpack`` for header compression, the
framing by hand), which shares nothing with grpc core: a flood on the main port does not
queue probes behind grpc core's threads, and a flood on this port does not reach the
main port.

It serves what the kubelet does (a new connection per probe, one Check, a 1 s timeout)
and a few Watch streams, and nothing else, so it is strict: every connection must
finish its preface and its first call within ``_ANSWER_SECONDS`` of being accepted, and
each later call within as long of its HEADERS; a connection without an open call is
closed as soon; at most ``_STREAMS`` calls at once and ``_CALLS_PER_CONNECTION`` in all
per connection; header blocks of at most ``_HEADER_LIST_BYTES``; requests of at most
``_MESSAGE_BYTES``; connections capped in all and per address (see ``_Server.admit``).
Why this design and what it costs:
docs/design.md, "The probe listener and the loop heartbeat".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import socket
import struct
import threading
import time
import typing
import zlib
from collections import Counter
from collections.abc import Mapping
from functools import cache
from typing import Final

import hpack
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from petsage_grpc.board._heartbeat import DEFAULT_STALL_SECONDS, LoopHeartbeat
from petsage_grpc.board._status import ServingStatus, StatusBoard
from petsage_grpc.services._health import HEALTH_SERVICE, RESPONSES

__all__ = ["ProbeListener"]

_log = logging.getLogger("petsage_grpc.server")

_ANSWER_SECONDS: Final = 2.0
"""From accept to the first answer, from a call's HEADERS to its whole request, and the
idle time of a connection without calls: twice the kubelet's default timeout."""
_STREAMS: Final = 16
"""SETTINGS_MAX_CONCURRENT_STREAMS: a stream beyond it is refused (REFUSED_STREAM)."""
_CALLS_PER_CONNECTION: Final = 100
"""Calls on one connection in all; then GOAWAY, and the client reconnects."""
_HEADER_LIST_BYTES: Final = 8192
"""Both the header block as received (HEADERS and CONTINUATION) and the decoded list."""
_MESSAGE_BYTES: Final = 1024
_STREAM_WINDOW: Final = 2048
"""SETTINGS_INITIAL_WINDOW_SIZE: a request (at most 1 KiB) fits; no stream gets more."""
_MAX_FRAME: Final = 16_384
_WRITE_BUFFER_BYTES: Final = 16_384
"""A connection whose unsent answers pass this (a peer that does not read) is closed."""
_CONTROL_BURST: Final = 32
_CONTROL_PER_SECOND: Final = 4.0
"""PING and SETTINGS frames a connection may send: a burst, then this many a second."""
_WARNING_PERIOD: Final = 60.0
_ACCEPT_QUEUE: Final = 1024
_ACCEPT_BATCH: Final = 32
_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_CHECK_PATH: Final = f"/{HEALTH_SERVICE}/Check"
_WATCH_PATH: Final = f"/{HEALTH_SERVICE}/Watch"

_FRAME_HEADER: Final = struct.Struct(">IBI")
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_NO_ERROR, _PROTOCOL_ERROR, _FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
_FRAME_SIZE_ERROR, _REFUSED_STREAM, _CANCEL = 0x6, 0x7, 0x8
_COMPRESSION_ERROR, _ENHANCE_YOUR_CALM = 0x9, 0xB
_OK, _INVALID_ARGUMENT, _DEADLINE_EXCEEDED, _NOT_FOUND = 0, 3, 4, 5
_RESOURCE_EXHAUSTED, _UNIMPLEMENTED, _UNAVAILABLE = 8, 12, 14


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME_HEADER.pack(len(payload) << 8 | kind, flags, stream) + payload


def _encode(headers: list[tuple[str, str]]) -> bytes:
    # Literals never indexed: every block stands alone, and no per-connection encoder
    # table is kept (or grown by a peer's SETTINGS_HEADER_TABLE_SIZE).
    return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers])


_SETTINGS_PAYLOAD: Final = b"".join(
    struct.pack(">HI", key, value)
    for key, value in (
        (0x2, 0),  # ENABLE_PUSH
        (0x3, _STREAMS),  # MAX_CONCURRENT_STREAMS
        (0x4, _STREAM_WINDOW),  # INITIAL_WINDOW_SIZE
        (0x6, _HEADER_LIST_BYTES),  # MAX_HEADER_LIST_SIZE
    )
)
_RESPONSE_HEADERS: Final = _encode([(":status", "200"), ("content-type", "application/grpc")])
_OK_TRAILERS: Final = _encode([("grpc-status", "0")])


@cache
def _status_block(code: int, message: str) -> bytes:
    """A trailers-only answer's header block (fixed messages only: the cache is bounded)."""
    return _encode(
        [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", str(code)),
            ("grpc-message", message),
        ]
    )


def _message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class _Call:
    """One stream: its request as it arrives, then its answer."""

    __slots__ = (
        "body",
        "encoding",
        "ended",
        "path",
        "pending",
        "send_window",
        "started",
        "task",
        "trailers",
        "watching",
    )

    def __init__(self, path: str, send_window: int, started: float) -> None:
        self.path = path
        self.started = started
        self.send_window = send_window
        self.body = bytearray()
        self.encoding = "identity"
        self.ended = False
        """The request is whole (END_STREAM seen)."""
        self.watching = False
        self.pending: bytes | None = None
        """An answer message that waits for the peer's flow-control window (latest wins)."""
        self.trailers: bytes | None = None
        """Trailers that wait behind *pending*."""
        self.task: asyncio.Task[None] | None = None


class _RefusalError(Exception):
    """Close the connection: GOAWAY with *code*, counted under *reason*."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _Connection(asyncio.Protocol):
    """One client connection, on the listener's loop.

    All its state is bounded: a frame being read, one header block, ``_STREAMS`` calls.
    """

    def __init__(self, listener: _Server) -> None:
        self._server = listener
        self._transport: asyncio.Transport | None = None
        self.address = ""
        self._buffer = bytearray()
        self._preface = False
        self._decoder = hpack.Decoder(max_header_list_size=_HEADER_LIST_BYTES)
        self._block = bytearray()
        self._block_stream = 0
        self._block_end_stream = False
        self._calls: dict[int, _Call] = {}
        self._last_stream = 0
        self._call_count = 0
        self._answered = False
        self._accepted = time.monotonic()
        self._last_active = self._accepted
        self._peer_window = 65_535
        self._connection_window = 65_535
        self._control_tokens = float(_CONTROL_BURST)
        self._control_at = self._accepted
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._out: list[bytes] | None = None
        """Frames to write, while a read is handled (sent together after it)."""

    @property
    def holds_watch(self) -> bool:
        return any(call.watching for call in self._calls.values())

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = tcp = typing.cast("asyncio.Transport", transport)  # a TCP server's
        peer = tcp.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        self.address = address.removeprefix("::ffff:")
        if not self._server.admit(self):
            tcp.abort()
            self._closing = True
            return
        tcp.write(_frame(_SETTINGS, 0, 0, _SETTINGS_PAYLOAD))
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        # What this read makes the connection write leaves in one send: each socket
        # call gives up the GIL, and a busy application then makes this thread wait
        # for it once per call (docs/design.md).
        self._out = []
        try:
            self._read_frames()
        except _RefusalError as refusal:
            self.refuse(refusal.reason, refusal.code)
        except hpack.HPACKError:
            self.refuse("protocol", _COMPRESSION_ERROR)
        except Exception:  # noqa: BLE001 - whatever a client sent, no traceback: counted
            self.refuse("internal", _PROTOCOL_ERROR)
        finally:
            self._flush_out()
        if not self._closing:
            self._check_write_buffer()
            self._arm()

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for call in self._calls.values():
            if call.task is not None:
                call.task.cancel()
        self._calls.clear()
        self._server.forget(self)

    # -- closing ---------------------------------------------------------------------

    def refuse(self, reason: str, code: int = _ENHANCE_YOUR_CALM) -> None:
        """Close the connection for *reason* (counted), with GOAWAY *code*."""
        self._server.count(reason)
        self.close(code)

    def close(self, code: int = _NO_ERROR) -> None:
        """GOAWAY, then close once what is written has left (abort if it cannot)."""
        if self._closing or self._transport is None:
            return
        self._flush_out()
        self._closing = True
        self._transport.write(_frame(_GOAWAY, 0, 0, struct.pack(">II", self._last_stream, code)))
        if self._transport.get_write_buffer_size() > _WRITE_BUFFER_BYTES:
            self._transport.abort()
        else:
            self._transport.close()
        if self._timer is not None:
            self._timer.cancel()
        # A peer that never reads would keep a closing transport: abort it later.
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(_ANSWER_SECONDS, self._transport.abort)

    def abort(self) -> None:
        """Drop the connection at once."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        """(Re)schedule the one timer that enforces this connection's deadlines."""
        if self._closing:
            return
        # Calls other than Watch streams are open until answered: waiting for their
        # request, or for the peer's window to take their answer.
        awaiting = [call.started for call in self._calls.values() if not call.watching]
        if not self._answered:
            awaiting.append(self._accepted)
        elif not self._calls:
            awaiting.append(self._last_active)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if awaiting:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(
                loop.time() + min(awaiting) + _ANSWER_SECONDS - time.monotonic(), self._expire
            )

    def _expire(self) -> None:
        self._timer = None
        if self._closing:
            return
        if self._answered and not self._calls:
            self.close()  # idle: done with, not refused
        else:
            self.refuse("deadline")

    def _check_write_buffer(self) -> None:
        if self._transport is not None and (
            self._transport.get_write_buffer_size() > _WRITE_BUFFER_BYTES
        ):
            self._server.count("slow_reader")
            self._closing = True
            self._transport.abort()

    # -- reading ---------------------------------------------------------------------

    def _read_frames(self) -> None:
        if not self._preface:
            if len(self._buffer) < len(_PREFACE):
                if not _PREFACE.startswith(self._buffer):
                    raise _RefusalError("protocol", _PROTOCOL_ERROR)
                return
            if not self._buffer.startswith(_PREFACE):
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
            del self._buffer[: len(_PREFACE)]
            self._preface = True
        view = self._buffer
        offset = 0
        while len(view) - offset >= 9 and not self._closing:
            length = int.from_bytes(view[offset : offset + 3], "big")
            if length > _MAX_FRAME:
                raise _RefusalError("protocol", _FRAME_SIZE_ERROR)
            if len(view) - offset < 9 + length:
                break
            kind, flags = view[offset + 3], view[offset + 4]
            stream = int.from_bytes(view[offset + 5 : offset + 9], "big") & 0x7FFF_FFFF
            payload = bytes(view[offset + 9 : offset + 9 + length])
            offset += 9 + length
            self._on_frame(kind, flags, stream, payload)
        # A new, right-sized buffer: one that took a large read would keep its size.
        self._buffer = self._buffer[offset:]

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:  # noqa: PLR0912 - one branch per frame type
        if self._block_stream and kind != _CONTINUATION:
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        if kind == _DATA:
            self._on_data(flags, stream, payload)
        elif kind == _HEADERS:
            self._on_headers(flags, stream, payload)
        elif kind == _CONTINUATION:
            if stream == 0 or stream != self._block_stream:
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
            self._add_to_block(payload, flags)
        elif kind == _SETTINGS:
            self._on_settings(flags, stream, payload)
        elif kind == _PING:
            if stream != 0 or len(payload) != 8:
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
            if not flags & _ACK:
                self._spend_control()
                self._write(_frame(_PING, _ACK, 0, payload))
        elif kind == _WINDOW_UPDATE:
            self._on_window_update(stream, payload)
        elif kind == _RST_STREAM:
            call = self._calls.pop(stream, None)
            if call is not None and call.task is not None:
                call.task.cancel()
        elif kind == _GOAWAY:
            if not self._calls:
                self.close()
        elif kind == _PUSH_PROMISE:
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        # PRIORITY and unknown frame types are ignored, as HTTP/2 asks.

    def _spend_control(self) -> None:
        now = time.monotonic()
        self._control_tokens = min(
            _CONTROL_BURST, self._control_tokens + (now - self._control_at) * _CONTROL_PER_SECOND
        )
        self._control_at = now
        self._control_tokens -= 1
        if self._control_tokens < 0:
            raise _RefusalError("control_frames", _ENHANCE_YOUR_CALM)

    def _on_settings(self, flags: int, stream: int, payload: bytes) -> None:
        if stream != 0 or len(payload) % 6:
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        if flags & _ACK:
            return
        self._spend_control()
        for index in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, index)
            if key == 0x4:  # INITIAL_WINDOW_SIZE
                if value > 0x7FFF_FFFF:
                    raise _RefusalError("protocol", _FLOW_CONTROL_ERROR)
                change, self._peer_window = value - self._peer_window, value
                for call in self._calls.values():
                    call.send_window += change
        self._write(_frame(_SETTINGS, _ACK, 0))
        self._flush_all()

    def _on_window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _RefusalError("protocol", _FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFF_FFFF
        if stream == 0:
            self._connection_window += increment
            if self._connection_window > 0x7FFF_FFFF:
                raise _RefusalError("protocol", _FLOW_CONTROL_ERROR)
            self._flush_all()
        elif (call := self._calls.get(stream)) is not None:
            call.send_window = min(call.send_window + increment, 0x7FFF_FFFF)
            self._flush(stream, call)

    def _on_headers(self, flags: int, stream: int, payload: bytes) -> None:
        if stream == 0 or stream % 2 == 0:
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        start, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
            start, end = 1, len(payload) - payload[0]
        if flags & _PRIORITY_FLAG:
            start += 5
        if start > end:
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        if stream <= self._last_stream:
            # Trailers on a request, or a stream ID going back: neither is a probe.
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        self._last_stream = stream
        self._block_stream = stream
        self._block_end_stream = bool(flags & _END_STREAM)
        self._block.clear()
        self._add_to_block(payload[start:end], flags)

    def _add_to_block(self, fragment: bytes, flags: int) -> None:
        if len(self._block) + len(fragment) > _HEADER_LIST_BYTES:
            raise _RefusalError("header_list", _ENHANCE_YOUR_CALM)
        self._block += fragment
        if not flags & _END_HEADERS:
            return
        stream, self._block_stream = self._block_stream, 0
        try:
            headers = self._decoder.decode(bytes(self._block), raw=False)
        except hpack.OversizedHeaderListError:
            raise _RefusalError("header_list", _ENHANCE_YOUR_CALM) from None
        except (hpack.HPACKError, UnicodeDecodeError):
            raise _RefusalError("protocol", _COMPRESSION_ERROR) from None
        finally:
            self._block.clear()
        fields = {str(name): str(value) for name, value in headers}
        self._open(stream, fields, end_stream=self._block_end_stream)

    def _open(self, stream: int, headers: dict[str, str], *, end_stream: bool) -> None:
        self._call_count += 1
        if len(self._calls) >= _STREAMS or self._call_count > _CALLS_PER_CONNECTION:
            self._server.count("streams")
            self._write(_frame(_RST_STREAM, 0, stream, struct.pack(">I", _REFUSED_STREAM)))
            if self._call_count > _CALLS_PER_CONNECTION:
                self.close()
            return
        call = _Call(headers.get(":path", ""), self._peer_window, time.monotonic())
        self._calls[stream] = call
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith(
            "application/grpc"
        ):
            self._finish(stream, call, _status_block(_UNIMPLEMENTED, "not a gRPC request"))
            return
        if call.path not in (_CHECK_PATH, _WATCH_PATH):
            self._finish(stream, call, _status_block(_UNIMPLEMENTED, "method not found"))
            return
        call.encoding = headers.get("grpc-encoding", "identity")
        if end_stream:
            self._on_request(stream, call)

    def _on_data(self, flags: int, stream: int, payload: bytes) -> None:
        if stream == 0:
            raise _RefusalError("protocol", _PROTOCOL_ERROR)
        # Every byte received is read at once: the connection's window is given back,
        # and a stream's own never grows past _STREAM_WINDOW.
        if payload:
            self._write(_frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload))))
        call = self._calls.get(stream)
        if call is None or call.ended:
            if stream > self._last_stream:
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
            return  # a stream already answered or reset
        start, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
            start, end = 1, len(payload) - payload[0]
            if start > end:
                raise _RefusalError("protocol", _PROTOCOL_ERROR)
        if len(call.body) + end - start > 5 + _MESSAGE_BYTES:
            self._server.count("request_size")
            self._finish(
                stream,
                call,
                _status_block(_RESOURCE_EXHAUSTED, f"request larger than {_MESSAGE_BYTES} bytes"),
                reset=True,
            )
            return
        call.body += payload[start:end]
        if flags & _END_STREAM:
            self._on_request(stream, call)

    # -- answering -------------------------------------------------------------------

    def _on_request(self, stream: int, call: _Call) -> None:
        call.ended = True
        request, problem = self._request(call)
        if problem is not None:
            self._finish(stream, call, _status_block(_INVALID_ARGUMENT, problem))
            return
        try:
            service = str(health_pb2.HealthCheckRequest.FromString(request).service)
        except DecodeError:
            self._finish(
                stream, call, _status_block(_INVALID_ARGUMENT, "malformed HealthCheckRequest")
            )
            return
        if len(service) > self._server.max_name:
            message = f"service name longer than {self._server.max_name} characters"
            self._finish(stream, call, _status_block(_INVALID_ARGUMENT, message))
            return
        if call.path == _CHECK_PATH:
            status = self._server.board.get(service)
            if status is None:
                self._finish(stream, call, _status_block(_NOT_FOUND, "unknown service"))
                return
            self._write(_frame(_HEADERS, _END_HEADERS, stream, _RESPONSE_HEADERS))
            call.trailers = _OK_TRAILERS
            self._send(stream, call, RESPONSES[status])
            return
        if not self._server.take_watch():
            self._server.count("watch_cap")
            self._finish(stream, call, _status_block(_RESOURCE_EXHAUSTED, "too many Watch streams"))
            return
        call.watching = True
        self._write(_frame(_HEADERS, _END_HEADERS, stream, _RESPONSE_HEADERS))
        call.task = asyncio.get_running_loop().create_task(self._watch(stream, call, service))

    def _request(self, call: _Call) -> tuple[bytes, str | None]:  # noqa: PLR0911 - one rule per return
        """The request message, or a problem with it."""
        body = bytes(call.body)
        if len(body) < 5:
            return b"", "missing request message"
        flag, length = body[0], int.from_bytes(body[1:5], "big")
        if len(body) != 5 + length:
            return b"", "malformed request message"
        if not flag:
            return body[5:], None
        if call.encoding != "gzip":
            return b"", "unsupported compression"
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            message = inflater.decompress(body[5:], _MESSAGE_BYTES + 1)
        except zlib.error:
            return b"", "malformed request message"
        if len(message) > _MESSAGE_BYTES:
            return b"", f"request larger than {_MESSAGE_BYTES} bytes"
        return message, None

    async def _watch(self, stream: int, call: _Call, service: str) -> None:
        board = self._server.board
        try:
            watcher = board.subscribe(service)
            if watcher is None:  # the board has ended watches
                call.trailers = _OK_TRAILERS
                self._flush(stream, call)
                return
            try:
                status: ServingStatus | None = None
                while (status := await watcher.next(status)) is not None:
                    self._send(stream, call, RESPONSES[status])
                    self._check_write_buffer()
                    if self._closing:
                        return
                # The board ended watches (a drain or a stop): end the stream with OK.
                call.trailers = _OK_TRAILERS
                self._flush(stream, call)
            finally:
                board.unsubscribe(service, watcher)
        finally:
            self._server.give_watch()

    def _send(self, stream: int, call: _Call, message: bytes) -> None:
        call.pending = _message(message)
        self._flush(stream, call)

    def _flush_all(self) -> None:
        for stream, call in list(self._calls.items()):
            self._flush(stream, call)

    def _flush(self, stream: int, call: _Call) -> None:
        """Write what *call* has pending, as far as the peer's windows allow."""
        pending = call.pending
        if pending is not None:
            if min(call.send_window, self._connection_window) < len(pending):
                return  # until the peer opens its window
            call.send_window -= len(pending)
            self._connection_window -= len(pending)
            call.pending = None
            self._write(_frame(_DATA, 0, stream, pending))
            self._answered = True
        if call.trailers is not None:
            self._write(_frame(_HEADERS, _END_HEADERS | _END_STREAM, stream, call.trailers))
            self._done(stream)

    def _finish(
        self,
        stream: int,
        call: _Call,
        block: bytes,
        *,
        reset: bool = False,
    ) -> None:
        """End *call* with a trailers-only answer (*block*)."""
        self._answered = True
        call.pending = None
        self._write(_frame(_HEADERS, _END_HEADERS | _END_STREAM, stream, block))
        if reset:
            self._write(_frame(_RST_STREAM, 0, stream, struct.pack(">I", _NO_ERROR)))
        self._done(stream)

    def _done(self, stream: int) -> None:
        self._calls.pop(stream, None)
        self._last_active = time.monotonic()
        if not self._closing:
            self._arm()

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._closing:
            return
        if self._out is not None:
            self._out.append(data)
        else:
            self._transport.write(data)

    def _flush_out(self) -> None:
        out, self._out = self._out, None
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def end_watches(self) -> None:
        """End every Watch stream with OK (the listener stops)."""
        for stream, call in list(self._calls.items()):
            if call.watching:
                if call.task is not None:
                    call.task.cancel()
                call.pending = None
                call.trailers = _OK_TRAILERS
                self._flush(stream, call)

    @property
    def busy(self) -> bool:
        """Whether a call other than a Watch stream is open."""
        return any(not call.watching for call in self._calls.values())


class _Server:
    """The listener's state on its own loop: connections, caps and refusal counts."""

    def __init__(
        self,
        board: StatusBoard,
        *,
        max_name: int,
        max_watch_streams: int,
        max_connections: int,
        max_per_address: int,
    ) -> None:
        self.board = board
        self.max_name = max_name
        self._watch_places = max_watch_streams
        self._max_connections = max_connections
        self._max_per_address = max_per_address
        self.connections: dict[_Connection, None] = {}
        """Oldest first."""
        self._by_address: dict[str, dict[_Connection, None]] = {}
        self.counts: Counter[str] = Counter()
        self.counts_lock = threading.Lock()
        self._unreported: Counter[str] = Counter()
        self._next_warning = 0.0
        self._warning_timer: asyncio.TimerHandle | None = None

    def admit(self, connection: _Connection) -> bool:
        """Make room for *connection*, or refuse it (False).

        At the per-address cap, the address's oldest connection without a Watch stream
        is closed. At the cap in all, a connection from an address that has others open
        is refused (at once: the cheapest answer to a flood that reconnects), and one
        from an address without any (the kubelet's, during a flood) closes the oldest
        such connection of the address that holds the most.
        """
        same = self._by_address.get(connection.address, {})
        if len(same) >= self._max_per_address and not self._evict(same, "address_cap"):
            return False
        if len(self.connections) >= self._max_connections:
            if same:
                self.count("connection_cap")
                return False
            # One pass finds the heaviest address; a sort only if its connections all
            # hold Watch streams (rare: those are 8 at most).
            heaviest = max(self._by_address.values(), key=len)
            if not self._evict(heaviest, "connection_cap") and not any(
                self._evict(members, "connection_cap")
                for members in sorted(self._by_address.values(), key=len, reverse=True)
            ):
                self.count("connection_cap")
                return False
        self.connections[connection] = None
        self._by_address.setdefault(connection.address, {})[connection] = None
        return True

    def _evict(self, members: dict[_Connection, None], reason: str) -> bool:
        """Close the oldest of *members* that holds no Watch stream; False if none does."""
        victim = next((c for c in members if not c.holds_watch), None)
        if victim is None:
            if reason == "address_cap":
                self.count(reason)
            return False
        victim.refuse(reason)
        self.forget(victim)
        return True

    def forget(self, connection: _Connection) -> None:
        self.connections.pop(connection, None)
        same = self._by_address.get(connection.address)
        if same is not None:
            same.pop(connection, None)
            if not same:
                del self._by_address[connection.address]

    def take_watch(self) -> bool:
        if self._watch_places <= 0:
            return False
        self._watch_places -= 1
        return True

    def give_watch(self) -> None:
        self._watch_places += 1

    def count(self, reason: str) -> None:
        """Count a refusal; warn at once, then at most once a period with what came since."""
        with self.counts_lock:
            self.counts[reason] += 1
        self._unreported[reason] += 1
        now = time.monotonic()
        if now >= self._next_warning:
            self._warn()
        elif self._warning_timer is None:
            loop = asyncio.get_running_loop()
            self._warning_timer = loop.call_at(loop.time() + self._next_warning - now, self._warn)

    def flush_warning(self) -> None:
        """Warn about refusals not yet warned about (the listener stops)."""
        if self._warning_timer is not None:
            self._warning_timer.cancel()
        self._warn()

    def _warn(self) -> None:
        self._warning_timer = None
        if not self._unreported:
            return
        self._next_warning = time.monotonic() + _WARNING_PERIOD
        details = ", ".join(f"{k} {n}" for k, n in sorted(self._unreported.items()))
        _log.warning(
            "probe port refused or closed %d connection(s) or call(s): %s",
            sum(self._unreported.values()),
            details,
            extra={"event": "probe_port_refused", "counts": dict(self._unreported)},
        )
        self._unreported.clear()


class ProbeListener:
    """Health's Check and Watch on a plaintext port of their own, answered off the event loop.

    For an embedding backend: point the kubelet's probes at this port, and they are
    answered in milliseconds however busy the application's ``grpc.aio`` loop is, from
    the same board as :func:`~petsage_grpc.add_to_server`'s services. With
    *stall_seconds*, a heartbeat on the application's loop proves the loop runs: when it
    has not run for longer than that, ``liveness`` reports NOT_SERVING (everywhere the
    board is seen), and SERVING again once it runs.

    Start it on the application's event loop, with the application's server, and stop
    it after that server (:func:`~petsage_grpc.graceful_stop` does both, in that order)::

        async with ProbeListener(board, port=8081):
            await server.start()
            ...

    Other Health methods (List), SmokeTest and reflection are not served here
    (UNIMPLEMENTED). It is strict, for probes: a connection must send its first whole
    call within 2 s of being accepted (and each later one within 2 s of its HEADERS),
    and is closed after 2 s without calls; at most 16 calls at once and 100 in all per
    connection, header blocks of 8 KiB, requests of 1 KiB. At
    *max_connections_per_address* from one address, a new connection closes that
    address's oldest one without a Watch stream; at *max_connections* in all, a new
    connection from an address that has others open is refused, and one from an
    address without any (a probe during a flood) closes the oldest connection without
    a Watch stream of the address holding the most. At most *max_watch_streams* Watch
    streams are open; one more is refused with RESOURCE_EXHAUSTED. Each refusal is
    counted (:meth:`refusals`) and warned about, at most once a minute.
    """

    def __init__(
        self,
        board: StatusBoard,
        *,
        port: int,
        host: str = "",
        stall_seconds: float | None = DEFAULT_STALL_SECONDS,
        shed_lag_seconds: float | None = None,
        max_watch_streams: int = 8,
        max_service_name_length: int = 256,
        max_connections: int = 128,
        max_connections_per_address: int = 16,
    ) -> None:
        """Prepare a listener on *host*:*port* ("" every interface; port 0 picks one).

        Args:
            board: The status board to answer from (``add_to_server``'s).
            port: TCP port; 0 picks a free one (see :attr:`port` once started).
            host: Address to listen on; "" means every interface.
            stall_seconds: ``liveness`` reports NOT_SERVING once the event loop that
                :meth:`start` runs on has not run for this long; None: no heartbeat, and
                ``liveness`` is left to the application.
            shed_lag_seconds: With the heartbeat, ``readiness`` and ``""`` also report
                NOT_SERVING while the loop runs this late (3 beats in a row), until it
                runs under half of it (5 beats in a row); None (the default): off.
            max_watch_streams: Open Watch streams on this port, at most.
            max_service_name_length: Longer names are refused with INVALID_ARGUMENT.
            max_connections: Open connections, at most (more than *max_watch_streams*).
            max_connections_per_address: Open connections from one address, at most.

        Raises:
            ValueError: an option is out of range.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, not {port}")
        if max_watch_streams < 1 or max_service_name_length < 1:
            raise ValueError("max_watch_streams and max_service_name_length must be at least 1")
        if max_connections <= max_watch_streams or max_connections_per_address < 1:
            raise ValueError(
                "max_connections must exceed max_watch_streams, and "
                "max_connections_per_address must be at least 1"
            )
        self._board = board
        self._host = host
        self._requested_port = port
        self._options = {
            "max_name": max_service_name_length,
            "max_watch_streams": max_watch_streams,
            "max_connections": max_connections,
            "max_per_address": max_connections_per_address,
        }
        self.heartbeat = (
            None
            if stall_seconds is None
            else LoopHeartbeat(
                board, stall_seconds=stall_seconds, shed_lag_seconds=shed_lag_seconds
            )
        )
        """The loop's heartbeat (its lag and stalls), or None without *stall_seconds*."""
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._grace: float | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The port listened on; 0 before :meth:`start`."""
        return self._port

    def refusals(self) -> Mapping[str, int]:
        """Connections and calls refused or closed since start, by reason (for metrics).

        Reasons: ``connection_cap``, ``address_cap`` (a connection closed at a cap),
        ``deadline`` (no whole call in time), ``header_list``, ``request_size``,
        ``streams`` (a stream beyond 16 at once or 100 in all), ``watch_cap``,
        ``slow_reader`` (answers not read), ``control_frames`` (PING/SETTINGS flood),
        ``protocol`` (not HTTP/2 as a client speaks it), ``internal`` (a request this
        server failed on: a bug, closed without a traceback). Safe from any thread.
        """
        server = self._server
        if server is None:
            return {}
        with server.counts_lock:
            return dict(server.counts)

    async def start(self) -> int:
        """Listen, answer from a thread of its own, and start the heartbeat; return the port.

        Call it on the application's event loop: that is the loop the heartbeat watches.

        Raises:
            OSError: the address cannot be listened on.
            RuntimeError: it is started already.
        """
        if self._thread is not None:
            raise RuntimeError("the probe listener is started already")
        sock = _listening_socket(self._host, self._requested_port)
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._server = _Server(self._board, **self._options)
        self._thread = threading.Thread(
            target=self._run, args=(sock, started), name="petsage-probe", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        self._port = int(sock.getsockname()[1])
        if self.heartbeat is not None:
            self.heartbeat.start()
        return self._port

    def _run(self, sock: socket.socket, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, sock, started))
        finally:
            loop.close()

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        started: concurrent.futures.Future[None],
    ) -> None:
        server = self._server
        if server is None:
            raise RuntimeError("the probe listener was not prepared")
        try:
            # asyncio accepts up to *backlog* connections per wake and listens with it:
            # a small batch, so that a probe is not handled behind a thousand new
            # connections, then the deep kernel queue again (Linux re-reads it).
            listening = await loop.create_server(
                lambda: _Connection(server), sock=sock, backlog=_ACCEPT_BATCH
            )
            sock.listen(_ACCEPT_QUEUE)
        except OSError as error:
            sock.close()
            started.set_exception(error)
            return
        self._loop = loop
        self._stopping = asyncio.Event()
        started.set_result(None)
        await self._stopping.wait()
        listening.close()
        server.flush_warning()
        for connection in list(server.connections):
            connection.end_watches()
        grace = self._grace or 0.0
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.busy for c in server.connections):  # noqa: ASYNC110 - a condition over every connection, polled at stop only
            await asyncio.sleep(0.05)
        for connection in list(server.connections):
            connection.close()
        # Let the cancelled Watch tasks finish and the transports report their close.
        deadline = time.monotonic() + _ANSWER_SECONDS
        while server.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - at stop only
            await asyncio.sleep(0.01)
        for connection in list(server.connections):
            connection.abort()
        await asyncio.sleep(0)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop the heartbeat, then stop listening; calls in flight get *grace_seconds*.

        Watch streams end with OK at once. ``liveness`` keeps whatever it reports. Safe
        to call more than once.
        """
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            self._grace = grace_seconds
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> ProbeListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket.

    "" is every interface: IPv6 and IPv4 on one socket where the machine has IPv6, IPv4
    alone where not.
    """
    host = host.strip("[]")
    if host:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror:
            raise OSError(f"cannot listen on {host}:{port}") from None
        family, address = infos[0][0], infos[0][4]
    elif socket.has_ipv6:
        family, address = socket.AF_INET6, ("::", port)
    else:
        family, address = socket.AF_INET, ("0.0.0.0", port)  # noqa: S104 - every interface, asked for
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EAFNOSUPPORT and not host:
                sock.close()
                return _listening_socket("0.0.0.0", port)  # noqa: S104
            raise
        # A deep accept queue: under a connection flood a probe's SYN waits its turn
        # (each accept takes microseconds) rather than being dropped and resent 1 s later.
        sock.listen(_ACCEPT_QUEUE)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
