"""``petsage-grpc probe``: a drop-in for grpc_health_probe, flags and exit codes alike.

A Kubernetes exec probe line written for grpc_health_probe works unchanged with
``petsage-grpc probe`` in its place. Flags follow Go's ``flag`` package: ``-name`` or
``--name``, ``-name=value`` or ``-name value``; parsing stops at the first argument
that is not a flag. Messages go to stderr, as grpc_health_probe's do.

Exit codes:
    0  the service answered SERVING (and -version)
    1  invalid arguments (unknown flag, bad value, conflicting TLS flags, unusable TLS
       file) and -help, as Go's flag package has it
    2  connection failed or timed out (a TLS mismatch looks like this too)
    3  the RPC failed: NOT_FOUND, UNIMPLEMENTED, DEADLINE_EXCEEDED, UNAUTHENTICATED, ...
    4  the service answered, but not SERVING
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from petsage_grpc._durations import format_go_duration, parse_go_duration
from petsage_grpc.cli._client import Connection

if TYPE_CHECKING:
    import grpc

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


class _ArgumentError(Exception):
    pass


class _HelpRequestedError(Exception):
    pass


# -- flags ----------------------------------------------------------------------------


@dataclass
class _Flags:
    addr: str = ""
    service: str = ""
    user_agent: str = "grpc_health_probe"
    connect_timeout: float = 1.0
    rpc_timeout: float = 1.0
    rpc_header: list[tuple[str, str]] = field(default_factory=list)
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
    return _check(flags)


def _connection(flags: _Flags) -> Connection:
    return Connection(
        addr=flags.addr,
        user_agent=flags.user_agent,
        connect_timeout=flags.connect_timeout,
        tls=flags.tls,
        tls_no_verify=flags.tls_no_verify,
        tls_ca_cert=flags.tls_ca_cert,
        tls_client_cert=flags.tls_client_cert,
        tls_client_key=flags.tls_client_key,
        tls_server_name=flags.tls_server_name,
    )


def _rpc_failure(error: grpc.RpcError, flags: _Flags) -> str:
    import grpc  # noqa: PLC0415

    code, details = error.code(), error.details()
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return (
            "error: this server does not implement the grpc health protocol "
            f"(grpc.health.v1.Health): {details}"
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"timeout: health rpc did not complete within {format_go_duration(flags.rpc_timeout)}"
        )
    return f"error: health rpc failed: rpc error: code = {_go_code(code)} desc = {details}"


def _check(flags: _Flags) -> int:
    # grpc_health_probe prints only its own lines; grpc core would add its own on TLS
    # failures. Read when grpc is first imported.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2  # noqa: PLC0415

    try:
        channel = _connection(flags).channel()
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        _log(f"failed to initialize tls credentials. error={error}")
        return EXIT_INVALID_ARGUMENTS
    with channel:
        if flags.v:
            _log("establishing connection")
        started = time.monotonic()
        try:
            grpc.channel_ready_future(channel).result(timeout=flags.connect_timeout)
        except grpc.FutureTimeoutError:
            _log(
                f'timeout: failed to connect service "{flags.addr}" '
                f"within {format_go_duration(flags.connect_timeout)}"
            )
            return EXIT_CONNECTION_FAILURE
        connected = time.monotonic()
        if flags.v:
            _log(f"connection established (took {format_go_duration(connected - started)})")
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = check(
                health_pb2.HealthCheckRequest(service=flags.service),
                timeout=flags.rpc_timeout,
                metadata=tuple(flags.rpc_header) or None,
                compression=grpc.Compression.Gzip if flags.gzip else None,
            )
        except grpc.RpcError as error:
            _log(_rpc_failure(error, flags))
            return EXIT_RPC_FAILURE
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            _log(f'service unhealthy (responded with "{status}")')
            return EXIT_UNHEALTHY
        if flags.v:
            elapsed = format_go_duration(time.monotonic() - connected)
            _log(f"time elapsed: connect={format_go_duration(connected - started)} rpc={elapsed}")
        _log(f"status: {status}")
        return EXIT_SERVING


def _go_code(code: object) -> str:
    """grpc-go's name for a status code: NOT_FOUND -> NotFound."""
    name: str = getattr(code, "name", str(code))
    return "".join(part.capitalize() for part in name.split("_"))
