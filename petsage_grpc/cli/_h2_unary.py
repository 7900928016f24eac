"""One unary gRPC call over one HTTP/2 connection, without grpcio.

The exec probe makes one ``Check`` per process: loading grpcio (and protobuf) would cost
several times what the call itself does. HTTP/2 framing comes from ``hyperframe`` and
header compression (HPACK, Huffman coding included) from ``hpack``; TLS (ALPN ``h2``,
verification on or off, client certificates) from ``ssl``. What is left is the small
part of HTTP/2 and gRPC that one call on a fresh connection needs: the preface and
SETTINGS exchange, PING and SETTINGS acknowledgements, HEADERS (with CONTINUATION) and
DATA on stream 1, RST_STREAM and GOAWAY, the length-prefixed message, ``grpc-status``
from trailers (or a trailers-only answer), and the spec's mapping of HTTP statuses and
stream resets to gRPC codes.

Flow control needs no bookkeeping here: the client opens its receive windows wide at
the start (and refuses answers over 4 MiB), and its one request is far smaller than any
send window a server grants. ``h2``, the full HTTP/2 state machine, is not used: with
the ``dataclasses`` and ``inspect`` modules it pulls in, it cost the probe a fifth to a
third of its CPU time and almost 2 MiB of memory (docs/benchmarks.md, "Exec probe").
"""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING, Final, NamedTuple

import hpack
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable, Sequence

__all__ = [
    "GrpcCode",
    "H2Channel",
    "NotConnectedError",
    "Reply",
    "parse_address",
]

_CHUNK: Final = 65536
_MAX_MESSAGE: Final = 4 * 1024 * 1024
"""As grpc's default receive limit: a bigger answer is RESOURCE_EXHAUSTED."""
_PREFIX: Final = struct.Struct(">BI")


class GrpcCode:
    """The gRPC status codes this client reports (numbers as the protocol has them)."""

    OK: Final = 0
    CANCELLED: Final = 1
    UNKNOWN: Final = 2
    DEADLINE_EXCEEDED: Final = 4
    PERMISSION_DENIED: Final = 7
    RESOURCE_EXHAUSTED: Final = 8
    UNIMPLEMENTED: Final = 12
    INTERNAL: Final = 13
    UNAVAILABLE: Final = 14
    UNAUTHENTICATED: Final = 16

    NAMES: Final = (
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    )


# gRPC's "HTTP to gRPC status code mapping" (doc/http-grpc-status-mapping.md), for
# answers that carry no grpc-status: a proxy's error page, a server that is not gRPC.
_HTTP_STATUS_CODES: Final = {
    400: GrpcCode.INTERNAL,
    401: GrpcCode.UNAUTHENTICATED,
    403: GrpcCode.PERMISSION_DENIED,
    404: GrpcCode.UNIMPLEMENTED,
    429: GrpcCode.UNAVAILABLE,
    502: GrpcCode.UNAVAILABLE,
    503: GrpcCode.UNAVAILABLE,
    504: GrpcCode.UNAVAILABLE,
}
# RST_STREAM error codes, as gRPC's PROTOCOL-HTTP2.md maps them.
_RESET_CODES: Final = {
    0x8: GrpcCode.CANCELLED,  # CANCEL
    0x7: GrpcCode.UNAVAILABLE,  # REFUSED_STREAM
    0xB: GrpcCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: GrpcCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


class NotConnectedError(Exception):
    """No usable HTTP/2 connection: refused, TLS failed, or the peer does not speak HTTP/2."""


class _ProtocolError(Exception):
    """The peer broke HTTP/2 (or sent what this client does not accept)."""


class Reply(NamedTuple):
    """The outcome of a call: its gRPC status, and the answer's message when OK."""

    code: int
    details: str = ""
    message: bytes = b""

    @property
    def code_name(self) -> str:
        """The code as grpc spells it, e.g. ``NOT_FOUND``."""
        names = GrpcCode.NAMES
        return names[self.code] if 0 <= self.code < len(names) else f"Code({self.code})"


def parse_address(addr: str) -> tuple[int, str | tuple[str, int], str]:
    """Split grpc_health_probe's ``-addr`` into (family, socket address, ``:authority``).

    ``unix://path`` and ``unix:path`` are Unix sockets; ``:port`` is this machine, as Go
    dials it; ``[v6]:port`` and ``host:port`` otherwise; no port means 443, as grpc-go's
    resolver has it.

    Raises:
        NotConnectedError: the port is not a number from 0 to 65535.
    """
    if addr.startswith("unix:"):
        path = addr.removeprefix("unix://") if addr.startswith("unix://") else addr[5:]
        return socket.AF_UNIX, path, "localhost"
    host, colon, port_text = addr.rpartition(":")
    if not colon or "]" in port_text:  # "host" or "[v6]": no port
        host, port_text = addr, "443"
    if not port_text.isdigit() or int(port_text) > _MAX_PORT:
        raise NotConnectedError(f"address {addr}: invalid port")
    host = host.removeprefix("[").removesuffix("]") or "localhost"
    authority = f"localhost{addr}" if addr.startswith(":") else addr
    return socket.AF_UNSPEC, (host, int(port_text)), authority


_MAX_PORT: Final = 65535
_STREAM: Final = 1
"""The one stream this client opens (client streams are odd, starting at 1)."""
_FRAME_SIZE: Final = 16384
"""SETTINGS_MAX_FRAME_SIZE's default, which this client keeps: the most it accepts."""
_WINDOW: Final = 1 << 24
"""Receive window announced for the stream and the connection: more than any answer."""
_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_INITIAL_WINDOW: Final = 65535
_ERROR_CANCEL: Final = 0x8


class H2Channel:
    """One HTTP/2 connection to a gRPC server, for one unary call; close it when done."""

    def __init__(self, sock: socket.socket, *, scheme: bytes, authority: str) -> None:
        self._sock = sock
        self._scheme = scheme
        self._authority = authority.encode()
        self._buffer = bytearray()
        self._decoder = hpack.Decoder()
        self._send_window = _INITIAL_WINDOW  # the server's SETTINGS may change it

    @classmethod
    def connect(
        cls,
        addr: str,
        *,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        server_name: str = "",
    ) -> H2Channel:
        """Connect to *addr* and wait for the server's HTTP/2 SETTINGS, as grpc does.

        Raises:
            NotConnectedError: refused, unreachable, timed out, the TLS handshake failed
                (or did not agree on ``h2``), the peer's first bytes are not HTTP/2
                SETTINGS, or *addr* has no usable port.
        """
        deadline = time.monotonic() + timeout
        family, where, authority = parse_address(addr)
        try:
            sock = _open_socket(family, where, timeout)
        except OSError as error:
            raise NotConnectedError(_reason(error)) from None
        try:
            # The TLS handshake and the SETTINGS wait share what is left of *timeout*.
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if tls is not None:
                hostname = server_name or (where[0] if isinstance(where, tuple) else "localhost")
                sock = tls.wrap_socket(sock, server_hostname=hostname)
                if sock.selected_alpn_protocol() != "h2":
                    raise NotConnectedError("the server did not agree to HTTP/2 (ALPN h2)")
            channel = cls(
                sock,
                scheme=b"https" if tls is not None else b"http",
                authority=server_name or authority,
            )
            channel._handshake(deadline)
        except BaseException as error:
            sock.close()
            if isinstance(error, OSError | _ProtocolError):
                raise NotConnectedError(_reason(error)) from None
            raise
        return channel

    def _handshake(self, deadline: float) -> None:
        """Send the preface; wait for the server's, which must start with SETTINGS."""
        settings = SettingsFrame(
            0,
            settings={
                SettingsFrame.ENABLE_PUSH: 0,
                SettingsFrame.INITIAL_WINDOW_SIZE: _WINDOW,
            },
        )
        # The connection's window is not a setting: it opens with a WINDOW_UPDATE.
        opening = WindowUpdateFrame(0, window_increment=_WINDOW - _INITIAL_WINDOW)
        self._sock.sendall(_PREFACE + settings.serialize() + opening.serialize())
        frame = self._next_frame(deadline)
        if frame is None:
            raise NotConnectedError("connection closed before the server's HTTP/2 settings")
        if not isinstance(frame, SettingsFrame) or "ACK" in frame.flags:
            raise _ProtocolError("the server's first frame is not SETTINGS")
        self._settings(frame)

    def _settings(self, frame: SettingsFrame) -> None:
        if "ACK" in frame.flags:
            return
        window = frame.settings.get(SettingsFrame.INITIAL_WINDOW_SIZE)
        if window is not None:
            self._send_window = min(window, _INITIAL_WINDOW)  # the connection's stays 65535
        self._sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())

    def unary(
        self,
        path: str,
        message: bytes,
        *,
        timeout: float,
        metadata: Sequence[tuple[str, str]] = (),
        user_agent: str = "",
        gzip: bool = False,
    ) -> Reply:
        """Make one unary call; every failure comes back as a :class:`Reply`, never raised."""
        deadline = time.monotonic() + timeout
        headers = [
            (b":method", b"POST"),
            (b":scheme", self._scheme),
            (b":path", path.encode()),
            (b":authority", self._authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            # grpc's timeout form: at most 8 digits, here in milliseconds.
            (b"grpc-timeout", f"{max(1, min(int(timeout * 1000), 99_999_999))}m".encode()),
        ]
        if user_agent:
            headers.append((b"user-agent", user_agent.encode()))
        flag = 0
        if gzip:
            import zlib  # noqa: PLC0415 - only with -gzip

            compressor = zlib.compressobj(wbits=31)  # 31: the gzip container
            message = compressor.compress(message) + compressor.flush()
            headers += [(b"grpc-encoding", b"gzip"), (b"grpc-accept-encoding", b"identity,gzip")]
            flag = 1
        headers += [(name.encode(), _metadata_value(name, value)) for name, value in metadata]
        body = _PREFIX.pack(flag, len(message)) + message
        if len(body) > self._send_window:
            return Reply(GrpcCode.RESOURCE_EXHAUSTED, "request larger than the server's window")
        try:
            self._sock.sendall(
                _headers_frames(hpack.Encoder().encode(headers)) + _data_frames(body)
            )
            return self._await_reply(deadline)
        except TimeoutError:
            self._cancel()
            return Reply(GrpcCode.DEADLINE_EXCEEDED, "context deadline exceeded")
        except (_ProtocolError, hpack.HPACKError) as error:
            return Reply(GrpcCode.INTERNAL, f"HTTP/2 protocol error: {error}")
        except OSError as error:
            return Reply(GrpcCode.UNAVAILABLE, f"connection error: {_reason(error)}")

    def _await_reply(self, deadline: float) -> Reply:
        answer = _Answer(self._decoder)
        while True:
            frame = self._next_frame(deadline)
            if frame is None:
                return Reply(GrpcCode.UNAVAILABLE, "connection closed before the answer")
            if answer.in_header_block and not isinstance(frame, ContinuationFrame):
                raise _ProtocolError("a header block was interrupted")
            if frame.stream_id == 0 or isinstance(frame, PushPromiseFrame):
                failed = self._connection_frame(frame)
                if failed is not None:
                    return failed
            elif frame.stream_id != _STREAM:
                continue  # no other stream is open
            elif isinstance(frame, RstStreamFrame):
                code = _RESET_CODES.get(frame.error_code, GrpcCode.INTERNAL)
                reason = f"stream reset by the server (HTTP/2 error {frame.error_code})"
                return Reply(code, reason)
            elif answer.take(frame):
                return answer.reply()
            elif len(answer.body) > _MAX_MESSAGE + _PREFIX.size:
                self._cancel()
                return Reply(GrpcCode.RESOURCE_EXHAUSTED, "answer larger than 4 MiB")

    def _connection_frame(self, frame: Frame) -> Reply | None:
        """Handle a frame about the whole connection; a Reply if it ends the call."""
        if isinstance(frame, SettingsFrame):
            self._settings(frame)
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            self._sock.sendall(
                PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize()
            )
        elif isinstance(frame, GoAwayFrame):
            # GOAWAY NO_ERROR covering this stream lets the answer finish.
            if frame.error_code != 0 or frame.last_stream_id < _STREAM:
                return Reply(GrpcCode.UNAVAILABLE, "the server closed the connection (GOAWAY)")
        elif isinstance(frame, PushPromiseFrame):
            raise _ProtocolError("PUSH_PROMISE after SETTINGS_ENABLE_PUSH 0")
        return None  # WINDOW_UPDATE and the rest: nothing to do

    def _next_frame(self, deadline: float) -> Frame | None:
        """The next whole frame (None: the connection ended first).

        Raises:
            TimeoutError: it did not arrive before *deadline*.
            _ProtocolError: it is malformed or larger than this client accepts.
        """
        while True:
            if len(self._buffer) >= _FRAME_HEADER:
                try:
                    frame, length = Frame.parse_frame_header(
                        memoryview(self._buffer)[:_FRAME_HEADER]
                    )
                except HyperframeError as error:
                    raise _ProtocolError(f"malformed frame: {error}") from None
                if length > _FRAME_SIZE:
                    raise _ProtocolError("frame larger than SETTINGS_MAX_FRAME_SIZE")
                if len(self._buffer) >= _FRAME_HEADER + length:
                    body = bytes(self._buffer[_FRAME_HEADER : _FRAME_HEADER + length])
                    del self._buffer[: _FRAME_HEADER + length]
                    try:
                        frame.parse_body(memoryview(body))
                    except HyperframeError as error:
                        raise _ProtocolError(f"malformed frame: {error}") from None
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            data = self._sock.recv(_CHUNK)
            if not data:
                return None
            self._buffer += data

    def _cancel(self) -> None:
        try:
            self._sock.settimeout(0.1)
            self._sock.sendall(RstStreamFrame(_STREAM, error_code=_ERROR_CANCEL).serialize())
        except OSError:
            pass  # the connection is closed right after anyway

    def close(self) -> None:
        """Say goodbye (GOAWAY) if the connection still works, then close it."""
        try:
            self._sock.settimeout(0.1)
            self._sock.sendall(GoAwayFrame(0, last_stream_id=0).serialize())
        except OSError:
            pass  # closing anyway
        finally:
            self._sock.close()


_FRAME_HEADER: Final = 9


def _headers_frames(block: bytes) -> bytes:
    """HEADERS, then CONTINUATION frames if the block needs them."""
    chunks = [block[at : at + _FRAME_SIZE] for at in range(0, len(block), _FRAME_SIZE)] or [b""]
    frames = []
    for index, chunk in enumerate(chunks):
        frame: Frame = (
            HeadersFrame(_STREAM, data=chunk) if index == 0 else ContinuationFrame(_STREAM, chunk)
        )
        if index == len(chunks) - 1:
            frame.flags.add("END_HEADERS")
        frames.append(frame.serialize())
    return b"".join(frames)


def _data_frames(body: bytes) -> bytes:
    """DATA frames of at most the default frame size, the last ending the stream."""
    chunks = [body[at : at + _FRAME_SIZE] for at in range(0, len(body), _FRAME_SIZE)]
    frames = [DataFrame(_STREAM, data=chunk) for chunk in chunks]
    frames[-1].flags.add("END_STREAM")
    return b"".join(frame.serialize() for frame in frames)


class _Answer:
    """What arrived on the call's stream so far."""

    def __init__(self, decoder: hpack.Decoder) -> None:
        self._decoder = decoder
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] | None = None
        self.body = b""
        self._block: bytearray | None = None  # a header block awaiting CONTINUATION
        self._block_ends_stream = False  # END_STREAM is on HEADERS, not on CONTINUATION

    @property
    def in_header_block(self) -> bool:
        """Whether only a CONTINUATION frame may come next."""
        return self._block is not None

    def take(self, frame: Frame) -> bool:
        """Add a frame of the stream; return whether the stream has ended.

        Raises:
            _ProtocolError: a CONTINUATION frame without a header block before it.
            hpack.HPACKError: the header block does not decode.
        """
        if isinstance(frame, DataFrame):
            self.body += frame.data
            return "END_STREAM" in frame.flags
        if isinstance(frame, HeadersFrame):
            self._block = bytearray(frame.data)
            self._block_ends_stream = "END_STREAM" in frame.flags
        elif isinstance(frame, ContinuationFrame):
            if self._block is None:
                raise _ProtocolError("CONTINUATION without HEADERS")
            self._block += frame.data
        if self._block is None or "END_HEADERS" not in frame.flags:
            return False
        decoded = _header_dict(self._decoder.decode(bytes(self._block), raw=True))
        self._block = None
        if not self.headers:
            self.headers = decoded
        else:
            self.trailers = decoded
        return self._block_ends_stream

    def reply(self) -> Reply:
        # A trailers-only answer carries grpc-status in its only HEADERS frame.
        status = self.trailers if self.trailers is not None else self.headers
        if "grpc-status" not in status:
            http_status = int(self.headers.get(":status", "0") or 0)
            if http_status != 200:
                code = _HTTP_STATUS_CODES.get(http_status, GrpcCode.UNKNOWN)
                return Reply(
                    code, f"unexpected HTTP status code received from server: {http_status}"
                )
            return Reply(GrpcCode.INTERNAL, "server closed the stream without sending trailers")
        try:
            code = int(status["grpc-status"])
        except ValueError:
            return Reply(GrpcCode.UNKNOWN, "malformed grpc-status")
        details = _percent_decode(status.get("grpc-message", ""))
        if code != GrpcCode.OK:
            return Reply(code, details)
        if not self.headers.get("content-type", "").startswith("application/grpc"):
            return Reply(GrpcCode.UNKNOWN, "the answer is not gRPC (content-type)")
        return self._message()

    def _message(self) -> Reply:
        if len(self.body) < _PREFIX.size:
            return Reply(GrpcCode.INTERNAL, "no response message for a unary call")
        compressed, length = _PREFIX.unpack_from(self.body)
        message = self.body[_PREFIX.size : _PREFIX.size + length]
        if len(message) != length or len(self.body) != _PREFIX.size + length:
            return Reply(GrpcCode.INTERNAL, "not exactly one response message for a unary call")
        if compressed:
            encoding = self.headers.get("grpc-encoding", "identity")
            if encoding != "gzip":
                return Reply(GrpcCode.INTERNAL, f"compressed answer with encoding {encoding!r}")
            import zlib  # noqa: PLC0415 - only for compressed answers

            inflater = zlib.decompressobj(wbits=47)  # 47: gzip or zlib, detected
            try:
                message = inflater.decompress(message, _MAX_MESSAGE)
            except zlib.error:
                return Reply(GrpcCode.INTERNAL, "the answer does not decompress")
            if inflater.unconsumed_tail:
                return Reply(GrpcCode.RESOURCE_EXHAUSTED, "answer larger than 4 MiB")
        return Reply(GrpcCode.OK, "", message)


def _open_socket(family: int, where: str | tuple[str, int], timeout: float) -> socket.socket:
    if isinstance(where, str):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = where
    # An ASCII name as bytes skips the idna codec (and its imports), which a str costs.
    sock = socket.create_connection(
        (host.encode() if host.isascii() else host, port),  # type: ignore[arg-type]
        timeout=timeout,
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _header_dict(headers: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    """Decoded headers by name (raw=True decoding gives bytes; str passes through)."""
    return {_text(name): _text(value) for name, value in headers}


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _metadata_value(name: str, value: str) -> bytes:
    if name.endswith("-bin"):  # binary metadata travels base64-encoded, unpadded
        import base64  # noqa: PLC0415

        return base64.b64encode(value.encode()).rstrip(b"=")
    return value.encode()


def _percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    from urllib.parse import unquote  # noqa: PLC0415 - rare: only escaped messages

    return unquote(text, errors="replace")


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return str(text)
