"""One unary gRPC call over one HTTP/2 connection, without grpcio.

The exec probe makes one ``Check`` per process: loading grpcio (and protobuf) would cost
several times what the call itself does. HTTP/2 framing, flow control and HPACK come
from ``h2``; TLS (ALPN ``h2``, verification on or off, client certificates) from ``ssl``.
Everything else is the small part of the gRPC-over-HTTP/2 protocol one call needs:
headers, the length-prefixed message, ``grpc-status`` from trailers (or a trailers-only
answer), and the spec's mapping of HTTP statuses and stream resets to gRPC codes.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence

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


@dataclass(frozen=True)
class Reply:
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
    dials it; ``[v6]:port`` and ``host:port`` otherwise.

    Raises:
        ValueError: no port, or a port that is not a number from 0 to 65535.
    """
    if addr.startswith("unix:"):
        path = addr.removeprefix("unix://") if addr.startswith("unix://") else addr[5:]
        return socket.AF_UNIX, path, "localhost"
    host, colon, port_text = addr.rpartition(":")
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"address {addr}: missing or invalid port")
    host = host.removeprefix("[").removesuffix("]") or "localhost"
    return socket.AF_UNSPEC, (host, int(port_text)), addr if addr[0] != ":" else f"localhost{addr}"


class H2Channel:
    """One HTTP/2 connection to a gRPC server, for unary calls; close it when done."""

    def __init__(self, sock: socket.socket, *, scheme: bytes, authority: str) -> None:
        self._sock = sock
        self._scheme = scheme
        self._authority = authority.encode()
        self._h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

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
                (or did not agree on ``h2``), or the peer's first bytes are not HTTP/2.
            ValueError: *addr* has no usable port.
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
            if isinstance(error, OSError | h2.exceptions.ProtocolError):
                raise NotConnectedError(_reason(error)) from None
            raise
        return channel

    def _handshake(self, deadline: float) -> None:
        self._h2.initiate_connection()
        self._flush()
        while True:
            events = self._receive(deadline)
            if events is None:
                raise NotConnectedError("connection closed before the server's HTTP/2 settings")
            if any(isinstance(event, h2.events.RemoteSettingsChanged) for event in events):
                return
            if any(isinstance(event, h2.events.ConnectionTerminated) for event in events):
                raise NotConnectedError("the server closed the HTTP/2 connection (GOAWAY)")

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
        stream = self._h2.get_next_available_stream_id()
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
        try:
            self._h2.send_headers(stream, headers)
            self._h2.send_data(stream, _PREFIX.pack(flag, len(message)) + message, end_stream=True)
            self._flush()
            return self._await_reply(stream, deadline)
        except TimeoutError:
            self._cancel(stream)
            return Reply(GrpcCode.DEADLINE_EXCEEDED, "context deadline exceeded")
        except h2.exceptions.ProtocolError as error:
            return Reply(GrpcCode.INTERNAL, f"HTTP/2 protocol error: {error}")
        except OSError as error:
            return Reply(GrpcCode.UNAVAILABLE, f"connection error: {_reason(error)}")

    def _await_reply(self, stream: int, deadline: float) -> Reply:
        answer = _Answer()
        while True:
            events = self._receive(deadline)
            if events is None:
                return Reply(GrpcCode.UNAVAILABLE, "connection closed before the answer")
            for event in events:
                if getattr(event, "stream_id", stream) != stream:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = _header_dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    answer.body += event.data
                    self._h2.acknowledge_received_data(event.flow_controlled_length, stream)
                    if len(answer.body) > _MAX_MESSAGE + _PREFIX.size:
                        self._cancel(stream)
                        return Reply(GrpcCode.RESOURCE_EXHAUSTED, "answer larger than 4 MiB")
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = _header_dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    return answer.reply()
                elif isinstance(event, h2.events.StreamReset):
                    code = _RESET_CODES.get(event.error_code, GrpcCode.INTERNAL)
                    return Reply(
                        code, f"stream reset by the server (HTTP/2 error {event.error_code})"
                    )
                elif isinstance(event, h2.events.ConnectionTerminated) and (
                    event.error_code != 0 or (event.last_stream_id or 0) < stream
                ):
                    # GOAWAY NO_ERROR covering this stream lets the answer finish.
                    return Reply(GrpcCode.UNAVAILABLE, "the server closed the connection (GOAWAY)")
            self._flush()

    def _receive(self, deadline: float) -> list[h2.events.Event] | None:
        """The events of the next bytes read, or None at end of stream.

        Raises:
            TimeoutError: nothing arrived before *deadline*.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)
        data = self._sock.recv(_CHUNK)
        if not data:
            return None
        events = self._h2.receive_data(data)
        self._flush()  # SETTINGS and PING acknowledgements, WINDOW_UPDATEs
        return events

    def _flush(self) -> None:
        if data := self._h2.data_to_send():
            self._sock.sendall(data)

    def _cancel(self, stream: int) -> None:
        try:
            self._h2.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
            self._sock.settimeout(0.1)
            self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass  # the connection is closed right after anyway

    def close(self) -> None:
        """Say goodbye (GOAWAY) if the connection still works, then close it."""
        try:
            self._h2.close_connection()
            self._sock.settimeout(0.1)
            self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass  # closing anyway
        finally:
            self._sock.close()


class _Answer:
    """What arrived on the call's stream so far."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] | None = None
        self.body = b""

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


def _header_dict(headers: Sequence[tuple[bytes, bytes]] | None) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in (headers or ())}


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
