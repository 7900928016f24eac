"""``petsage-grpc probe``: a drop-in for grpc_health_probe, flags and exit codes alike.

A Kubernetes exec probe line written for grpc_health_probe works unchanged with
``petsage-grpc probe`` in its place. Flags follow Go's ``flag`` package: ``-name`` or
``--name``, ``-name=value`` or ``-name value``; parsing stops at the first argument
that is not a flag. Messages go to stderr, as grpc_health_probe's do.

A probe runs every few seconds in every pod, inside its memory limit, so it pays only
for one ``Check``: one HTTP/2 connection (``cli/_h2_unary``: hyperframe and hpack;
``ssl`` for TLS, verifying or not) and two hand-encoded messages. Neither grpcio nor
protobuf is loaded.

Exit codes:
    0  the service answered SERVING (and -version)
    1  invalid arguments (unknown flag, bad value, conflicting TLS flags, unusable TLS
       file) and -help, as Go's flag package has it
    2  connection failed or timed out, retried until -connect-timeout as grpc's blocking
       dial does (a TLS mismatch, an HTTP/1 server or one that never sends HTTP/2
       SETTINGS look like this too)
    3  the RPC failed: NOT_FOUND, UNIMPLEMENTED, DEADLINE_EXCEEDED, UNAUTHENTICATED, ...
       (also an HTTP/2 server that is not gRPC, a reset stream, GOAWAY before the
       answer, a malformed answer)
    4  the service answered, but not SERVING
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from petsage_grpc._durations import format_go_duration, parse_go_duration
from petsage_grpc.cli._h2_unary import GrpcCode, H2Channel, NotConnectedError, Reply

if TYPE_CHECKING:
    import ssl

__all__ = [
    "EXIT_CONNECTION_FAILURE",
    "EXIT_INVALID_ARGUMENTS",
    "EXIT_RPC_FAILURE",
    "EXIT_SERVING",
    "EXIT_UNHEALTHY",
    "run_probe",
]

EXIT_SERVING: Final = 0
EXIT_INVALID_ARGUMENTS: Final = 1
EXIT_CONNECTION_FAILURE: Final = 2
EXIT_RPC_FAILURE: Final = 3
EXIT_UNHEALTHY: Final = 4

_FIRST_RETRY_SECONDS: Final = 0.1
_MAX_RETRY_SECONDS: Final = 1.0


class _ArgumentError(Exception):
    pass


class _HelpRequestedError(Exception):
    pass


# -- flags ----------------------------------------------------------------------------


class _Flags:
    """The parsed flags, defaults as grpc_health_probe's.

    A plain class: ``dataclasses`` imports ``inspect``, which would cost the probe more
    than all its own code.
    """

    addr: str = ""
    service: str = ""
    user_agent: str = "grpc_health_probe"
    connect_timeout: float = 1.0
    rpc_timeout: float = 1.0
    tls: bool = False
    tls_no_verify: bool = False
    tls_ca_cert: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_server_name: str = ""
    gzip: bool = False
    v: bool = False
    version: bool = False
    spiffe: bool = False
    alts: bool = False

    def __init__(self) -> None:
        self.rpc_header: list[tuple[str, str]] = []


_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise ValueError(f"invalid RPC header, expected 'key: value', got {text!r}")
    return name.strip().lower(), value.strip()


_FLAG_HELP: Final[dict[str, tuple[Callable[[str], object] | None, str]]] = {
    # name: (value parser, or None for a boolean flag; help)
    "addr": (str, "(required) tcp host:port or unix://path to connect"),
    "service": (str, 'service name to check (default: "")'),
    "user-agent": (
        str,
        'user-agent header value of health check requests (default "grpc_health_probe")',
    ),
    "connect-timeout": (parse_go_duration, "timeout for establishing connection (default 1s)"),
    "rpc-timeout": (parse_go_duration, "timeout for health check rpc (default 1s)"),
    "rpc-header": (_header, "additional RPC headers in 'name: value' format; repeatable"),
    "tls": (None, "use TLS (default: false, INSECURE plaintext transport)"),
    "tls-no-verify": (
        None,
        "(with -tls) don't verify the certificate (INSECURE) presented by the server",
    ),
    "tls-ca-cert": (
        str,
        "(with -tls, optional) file containing trusted certificates for verifying server",
    ),
    "tls-client-cert": (str, "(with -tls, optional) client certificate (requires -tls-client-key)"),
    "tls-client-key": (str, "(with -tls) client private key (requires -tls-client-cert)"),
    "tls-server-name": (
        str,
        "(with -tls) override the hostname used to verify the server certificate",
    ),
    "gzip": (None, "use gzip compression for the request and accept it for the response"),
    "v": (None, "verbose logs"),
    "version": (None, "print the version and exit"),
    "spiffe": (None, "not supported by petsage-grpc probe (exits 1)"),
    "alts": (None, "not supported by petsage-grpc probe (exits 1)"),
}


def _usage() -> str:
    lines = ["Usage of petsage-grpc probe:"]
    for name, (parser, text) in _FLAG_HELP.items():
        kind = "" if parser is None else (" duration" if parser is parse_go_duration else " string")
        lines.append(f"  -{name}{kind}\n    \t{text}")
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> _Flags:  # noqa: PLR0912 - as Go's FlagSet.parseOne
    """Parse *argv* as Go's flag package would, stopping at the first non-flag argument."""
    flags = _Flags()
    args = list(argv)
    while args:
        arg = args[0]
        if len(arg) < 2 or not arg.startswith("-"):
            break
        args.pop(0)
        if arg == "--":
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        if not body or body.startswith("-") or body.startswith("="):
            raise _ArgumentError(f"bad flag syntax: {arg}")
        name, has_value, value = body.partition("=")
        if name in {"h", "help"}:
            raise _HelpRequestedError
        if name not in _FLAG_HELP:
            raise _ArgumentError(f"flag provided but not defined: -{name}")
        parser, _ = _FLAG_HELP[name]
        attribute = name.replace("-", "_")
        if parser is None:
            if has_value and value not in _TRUE | _FALSE:
                raise _ArgumentError(f'invalid boolean value "{value}" for -{name}: parse error')
            setattr(flags, attribute, not has_value or value in _TRUE)
            continue
        if not has_value:
            if not args:
                raise _ArgumentError(f"flag needs an argument: -{name}")
            value = args.pop(0)
        try:
            parsed = parser(value)
        except ValueError as error:
            raise _ArgumentError(f'invalid value "{value}" for flag -{name}: {error}') from None
        if name == "rpc-header":
            flags.rpc_header.append(parsed)  # type: ignore[arg-type]
        else:
            setattr(flags, attribute, parsed)
    return flags


_CONFLICTS: Final[tuple[tuple[Callable[[_Flags], bool], str], ...]] = (
    (lambda f: not f.addr, "-addr not specified"),
    (lambda f: f.spiffe, "-spiffe is not supported by petsage-grpc probe"),
    (lambda f: f.alts, "-alts is not supported by petsage-grpc probe"),
    (lambda f: not f.tls and f.tls_no_verify, "specified -tls-no-verify without specifying -tls"),
    (lambda f: not f.tls and bool(f.tls_ca_cert), "specified -tls-ca-cert without specifying -tls"),
    (
        lambda f: not f.tls and bool(f.tls_client_cert),
        "specified -tls-client-cert without specifying -tls",
    ),
    (
        lambda f: not f.tls and bool(f.tls_server_name),
        "specified -tls-server-name without specifying -tls",
    ),
    (
        lambda f: bool(f.tls_client_cert) and not f.tls_client_key,
        "specified -tls-client-cert without specifying -tls-client-key",
    ),
    (
        lambda f: not f.tls_client_cert and bool(f.tls_client_key),
        "specified -tls-client-key without specifying -tls-client-cert",
    ),
    (
        lambda f: f.tls_no_verify and bool(f.tls_ca_cert),
        "cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)",
    ),
    (
        lambda f: f.tls_no_verify and bool(f.tls_server_name),
        "cannot specify -tls-server-name with -tls-no-verify (server name would not be used)",
    ),
)


def _validate(flags: _Flags) -> None:
    for broken, message in _CONFLICTS:
        if broken(flags):
            raise _ArgumentError(message)
    for name in ("connect_timeout", "rpc_timeout"):
        value = getattr(flags, name)
        if value <= 0:
            flag = name.replace("_", "-")
            raise _ArgumentError(
                f"-{flag} must be greater than zero (specified: {format_go_duration(value)})"
            )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_probe(argv: Sequence[str]) -> int:
    """Probe a server's ``grpc.health.v1.Health/Check`` and return grpc_health_probe's exit code."""
    try:
        flags = _parse(argv)
        if flags.version:
            from petsage_grpc.cli._version import installed_version  # noqa: PLC0415

            _log(f"petsage-grpc probe {installed_version()}")
            return EXIT_SERVING
        _validate(flags)
    except _HelpRequestedError:
        _log(_usage())
        return EXIT_INVALID_ARGUMENTS  # as Go's flag package makes grpc_health_probe do
    except _ArgumentError as error:
        _log(f"error: {error}")
        return EXIT_INVALID_ARGUMENTS
    if flags.v:
        _log("parsed options:")
        _log(
            f"> addr={flags.addr} conn_timeout={format_go_duration(flags.connect_timeout)} "
            f"rpc_timeout={format_go_duration(flags.rpc_timeout)}"
        )
        _log(f"> tls={str(flags.tls).lower()}")
        if flags.tls:
            _log(f"  > no-verify={str(flags.tls_no_verify).lower()}")
            _log(f"  > ca-cert={flags.tls_ca_cert}")
            _log(f"  > client-cert={flags.tls_client_cert}")
            _log(f"  > client-key={flags.tls_client_key}")
            _log(f"  > server-name={flags.tls_server_name}")
    return _check(flags)


def _tls_context(flags: _Flags) -> ssl.SSLContext | None:
    """The client TLS settings the flags ask for (None: plaintext).

    Raises:
        OSError: a TLS file cannot be read, the CA file holds no certificate, or the
            client key does not fit the certificate (ssl.SSLError is an OSError).
    """
    if not flags.tls:
        return None
    import ssl  # noqa: PLC0415 - only for TLS: it costs a plaintext probe time and memory

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if flags.tls_no_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif flags.tls_ca_cert:
        context.load_verify_locations(cafile=flags.tls_ca_cert)
        if not context.get_ca_certs():
            raise ssl.SSLError(f"no root CA certs parsed from file {flags.tls_ca_cert}")
    else:
        context.load_default_certs()
    if flags.tls_client_cert:
        context.load_cert_chain(flags.tls_client_cert, flags.tls_client_key)
    context.set_alpn_protocols(["h2"])
    return context


def _connect(flags: _Flags, context: ssl.SSLContext | None) -> H2Channel | None:
    """Connect within -connect-timeout, retrying as grpc's blocking dial does; None: failed."""
    deadline = time.monotonic() + flags.connect_timeout
    pause = _FIRST_RETRY_SECONDS
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            return H2Channel.connect(
                flags.addr,
                timeout=remaining,
                tls=context,
                server_name=flags.tls_server_name,
            )
        except NotConnectedError as error:
            if flags.v:
                _log(f"connection attempt failed: {error}")
        if deadline - time.monotonic() <= pause:
            return None  # no other attempt fits in the time left
        time.sleep(pause)
        pause = min(pause * 1.6, _MAX_RETRY_SECONDS)
    return None  # a sleep overran the deadline


def _rpc_failure(reply: Reply, flags: _Flags) -> str:
    if reply.code == GrpcCode.UNIMPLEMENTED:
        return (
            "error: this server does not implement the grpc health protocol "
            f"(grpc.health.v1.Health): {reply.details}"
        )
    if reply.code == GrpcCode.DEADLINE_EXCEEDED:
        return (
            f"timeout: health rpc did not complete within {format_go_duration(flags.rpc_timeout)}"
        )
    return (
        f"error: health rpc failed: rpc error: code = {_go_code(reply.code_name)} "
        f"desc = {reply.details}"
    )


def _check(flags: _Flags) -> int:
    try:
        context = _tls_context(flags)
    except OSError as error:  # ssl.SSLError is an OSError
        _log(f"failed to initialize tls credentials. error={error}")
        return EXIT_INVALID_ARGUMENTS
    if flags.v:
        _log("establishing connection")
    started = time.monotonic()
    channel = _connect(flags, context)
    if channel is None:
        _log(
            f'timeout: failed to connect service "{flags.addr}" '
            f"within {format_go_duration(flags.connect_timeout)}"
        )
        return EXIT_CONNECTION_FAILURE
    connected = time.monotonic()
    if flags.v:
        _log(f"connection established (took {format_go_duration(connected - started)})")
    try:
        reply = channel.unary(
            _CHECK_PATH,
            _health_check_request(flags.service),
            timeout=flags.rpc_timeout,
            metadata=flags.rpc_header,
            user_agent=flags.user_agent,
            gzip=flags.gzip,
        )
    finally:
        channel.close()
    status_number = 0
    if reply.code == GrpcCode.OK:
        try:
            status_number = _serving_status(reply.message)
        except ValueError as error:
            reply = Reply(GrpcCode.INTERNAL, f"grpc: failed to unmarshal the response: {error}")
    if reply.code != GrpcCode.OK:
        _log(_rpc_failure(reply, flags))
        return EXIT_RPC_FAILURE
    known = 0 <= status_number < len(_STATUS_NAMES)
    status = _STATUS_NAMES[status_number] if known else str(status_number)
    if status_number != _SERVING:
        _log(f'service unhealthy (responded with "{status}")')
        return EXIT_UNHEALTHY
    if flags.v:
        elapsed = format_go_duration(time.monotonic() - connected)
        _log(f"time elapsed: connect={format_go_duration(connected - started)} rpc={elapsed}")
    _log(f"status: {status}")
    return EXIT_SERVING


# -- grpc.health.v1 messages, by hand ----------------------------------------------------
# Two tiny messages do not justify loading protobuf (tens of milliseconds and megabytes):
# HealthCheckRequest{string service = 1}, HealthCheckResponse{ServingStatus status = 1}.

_CHECK_PATH: Final = "/grpc.health.v1.Health/Check"
_STATUS_NAMES: Final = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
_SERVING: Final = 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _health_check_request(service: str) -> bytes:
    """HealthCheckRequest wire bytes; proto3 leaves the empty default out."""
    name = service.encode()
    return b"\x0a" + _varint(len(name)) + name if name else b""


def _serving_status(message: bytes) -> int:
    """HealthCheckResponse.status (0 when absent); fields of newer versions are skipped.

    Raises:
        ValueError: *message* is not a valid protobuf encoding.
    """
    status, at = 0, 0
    while at < len(message):
        key, at = _read_varint(message, at)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            value, at = _read_varint(message, at)
            if field_number == 1:
                status = value if value < 1 << 31 else value - (1 << 64)  # int32 enum
        elif wire_type == 2:  # length-delimited
            length, at = _read_varint(message, at)
            at += length
        elif wire_type in (1, 5):  # fixed64, fixed32
            at += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if at > len(message):
            raise ValueError("truncated field")
    return status


def _go_code(name: str) -> str:
    """grpc-go's name for a status code: NOT_FOUND -> NotFound."""
    return "".join(part.capitalize() for part in name.split("_"))
