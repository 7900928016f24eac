"""The standalone server: a grpc.aio server with the PetSage services, run until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from petsage_grpc._check import Check
from petsage_grpc._drain import graceful_stop
from petsage_grpc._embed import add_to_server
from petsage_grpc._metrics import Metrics
from petsage_grpc._monitor import HealthMonitor
from petsage_grpc._status import StatusBoard

__all__ = ["ListenError", "ServeOptions", "format_address", "serve"]

_log = logging.getLogger("petsage_grpc.server")

# grpcio binds with SO_REUSEPORT by default, so a second server on a busy port would
# "succeed" and share the traffic; a port that is in use must be an error instead.
_SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """How the standalone server listens and stops."""

    host: str = ""
    """Address to listen on; "" means every interface (IPv6 and IPv4)."""
    port: int = 50051
    """TCP port; 0 picks a free one (it is logged)."""
    drain_seconds: float = 5.0
    """After SIGTERM, how long to keep answering with readiness NOT_SERVING."""
    grace_seconds: float = 5.0
    """After draining, how long calls in flight get to finish."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at ``/metrics`` on this port (same host); None: off."""
    checks: tuple[Check, ...] = ()
    """Dependency checks that readiness follows."""
    report_checks: bool = True
    """SmokeTest lists each check's name and state."""


class ListenError(Exception):
    """The server could not listen on the requested address."""


def format_address(host: str, port: int) -> str:
    """Return *host* and *port* as a gRPC listening address ("" means every interface)."""
    if not host:
        host = "::"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _bind_problem(host: str, port: int) -> str | None:
    """Say in a few words why *host*:*port* cannot be listened on, or None if it can.

    grpc core only reports that binding failed (and logs it to stderr), so the address
    is tried with a plain socket first, set up as grpc sets up its listeners.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return f"host {host!r} cannot be resolved"
    bindable = False
    for family, kind, proto, _, sockaddr in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # e.g. no IPv6 on this machine: grpc skips that family too
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return f"port {port} is already in use"
                if error.errno == errno.EACCES:
                    return f"permission denied for port {port}"
                if error.errno == errno.EADDRNOTAVAIL and host:
                    return f"host {host!r} is not an address of this machine"
                continue
            bindable = True
    return None if bindable else "no usable address"


async def serve(
    options: ServeOptions,
    *,
    board: StatusBoard | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Run the server until SIGTERM or SIGINT, then stop gracefully and return.

    A second signal cuts the drain and grace periods short.

    Raises:
        ListenError: an address cannot be listened on; nothing is left running.
    """
    address = format_address(options.host, options.port)
    ports = [options.port] if options.metrics_port is None else [options.port, options.metrics_port]
    for port in ports:
        problem = _bind_problem(options.host, port)
        if problem is not None:
            raise ListenError(f"cannot listen on {format_address(options.host, port)}: {problem}")
    board = StatusBoard() if board is None else board
    monitor = HealthMonitor(board, options.checks) if options.checks else None
    metrics = Metrics(board, monitor) if options.metrics_port is not None else None
    server = grpc.aio.server(
        options=_SERVER_OPTIONS, interceptors=[metrics.interceptor] if metrics else None
    )
    add_to_server(server, board=board, report_checks=options.report_checks)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        # Lost a race for the port since the check above; grpc has logged the details.
        await server.stop(None)
        raise ListenError(f"cannot listen on {address}") from None
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(server.stop, None)
        if monitor is not None:
            # Before the first answer, so that readiness already follows the checks.
            await monitor.start()
            stack.push_async_callback(monitor.stop)
        await server.start()
        if metrics is not None and options.metrics_port is not None:
            metrics_address = format_address(options.host, options.metrics_port)
            try:
                await metrics.start(options.host, options.metrics_port)
            except OSError as error:
                raise ListenError(
                    f"cannot listen on {metrics_address}: {error.strerror or error}"
                ) from None
            stack.push_async_callback(metrics.stop)
        bound = format_address(options.host, port)
        _log.info(
            "serving on %s", bound, extra={"event": "started", "address": bound, "port": port}
        )
        if on_listening is not None:
            on_listening(port)
        await _until_signal_then_stop(server, board, options)
    _log.info("stopped", extra={"event": "stopped"})


async def _until_signal_then_stop(
    server: grpc.aio.Server, board: StatusBoard, options: ServeOptions
) -> None:
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            _log.info("%s again: stopping now", name, extra={"event": "hurry"})
            hurry.set()
        else:
            _log.info("%s received", name, extra={"event": "signal"})
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
        await graceful_stop(
            server,
            board,
            drain_seconds=options.drain_seconds,
            grace_seconds=options.grace_seconds,
            hurry=hurry,
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
