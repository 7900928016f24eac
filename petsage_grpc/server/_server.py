"""The standalone server: a grpc.aio server with the PetSage services, run until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import grpc

from petsage_grpc.board._check import Check
from petsage_grpc.board._heartbeat import DEFAULT_STALL_SECONDS, LoopHeartbeat
from petsage_grpc.board._monitor import HealthMonitor
from petsage_grpc.board._status import StatusBoard
from petsage_grpc.services._auth import BearerToken
from petsage_grpc.services._drain import graceful_stop
from petsage_grpc.services._embed import add_to_server
from petsage_grpc.services._health import HealthLimits
from petsage_grpc.services._probe_listener import ProbeListener

__all__ = ["SERVER_OPTIONS", "ListenError", "ServeOptions", "format_address", "serve"]

if TYPE_CHECKING:
    from petsage_grpc.server._budget import Bounds
    from petsage_grpc.server._guard import MemoryGuard
    from petsage_grpc.server._http import HttpFace
    from petsage_grpc.server._reload import ConfigReloader
    from petsage_grpc.server._shedder import ConnectionShedder
    from petsage_grpc.server._tls import TlsFiles

_log = logging.getLogger("petsage_grpc.server")

SERVER_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    # grpcio binds with SO_REUSEPORT by default, so a second server on a busy port would
    # "succeed" and share the traffic; a port that is in use must be an error instead.
    ("grpc.so_reuseport", 0),
    # grpc core cancels new calls once 1000 (soft) to 3000 (hard) are waiting for the
    # application to pick them up: 10 000 watchers reconnecting after a deploy would lose
    # most of their Watch calls. Health calls are cheap; let the burst queue instead.
    ("grpc.server.max_pending_requests", 65_536),
    ("grpc.server.max_pending_requests_hard_limit", 131_072),
    # Health, reflection and smoke test requests are tiny.
    ("grpc.max_receive_message_length", 16 * 1024),
    # Per connection: the Watch cap per connection and room for unary calls beside it.
    # Beyond it, HTTP/2 makes the client wait instead of the server holding more calls.
    ("grpc.max_concurrent_streams", 1_100),
    # grpc core's own defaults (8 KiB soft, 16 KiB hard), stated: a health request's
    # metadata is a few hundred bytes.
    ("grpc.max_metadata_size", 8 * 1024),
    ("grpc.absolute_max_metadata_size", 16 * 1024),
    # A connection that has not finished its TLS handshake or HTTP/2 preface in 10 s is
    # closed (grpc's default is 120 s).
    ("grpc.server_handshake_timeout_ms", 10_000),
    # Find dead peers that hold Watch streams; refuse clients that ping too often.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    # Idle connections go after 5 minutes; every connection is recycled after 30 (with a
    # grace of 5), so load balancers rebalance and no peer holds resources forever.
    ("grpc.max_connection_idle_ms", 5 * 60_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 5 * 60_000),
)
"""grpc.aio server options for a health server; pass them when embedding, too."""


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
    http_port: int | None = None
    """Serve the HTTP endpoints and Prometheus ``/metrics`` on this port; None: off."""
    probe_port: int | None = None
    """Also serve Health's Check and Watch, in plaintext, from a thread of their own; None: off."""
    loop_stall_seconds: float = DEFAULT_STALL_SECONDS
    """``liveness`` reports NOT_SERVING while the event loop has not run for this long."""
    shed_lag_seconds: float | None = None
    """Readiness also follows the event loop's lag above this (with hysteresis); None: off."""
    tls: TlsFiles | None = None
    """Serve TLS (mTLS with a client CA) on the main port; None: plaintext."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token for List, SmokeTest's check list and (see below) reflection."""
    protect_reflection: bool = True
    """With a token, reflection requires it too."""
    limits: HealthLimits = field(default_factory=HealthLimits)
    """Caps on List size, service name length and Watch streams."""
    checks: tuple[Check, ...] = ()
    """Dependency checks that readiness follows."""
    report_checks: bool = True
    """SmokeTest lists each check's name and state."""
    config_path: str | None = None
    """The configuration file that SIGHUP re-reads (its checks change without a restart)."""
    config_poll_seconds: float = 0.0
    """Also re-read the configuration file when it changes, looking this often; 0: off."""
    bounds: Bounds | None = None
    """Caps derived from a memory budget (``derive_bounds``), with the memory watermark;
    None: SERVER_OPTIONS and *limits* alone, no watermark."""
    http_access_log: bool = False
    """Log one INFO line per HTTP request."""


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
    # A str host goes through Python's idna codec (and loads unicodedata, 0.5 MiB that
    # stays for the life of the process); an ASCII name needs no encoding.
    node: str | bytes | None = (host.encode() if host.isascii() else host) or None
    try:
        infos = socket.getaddrinfo(node, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
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


@dataclass
class _Assembly:
    """Everything serve() runs, built before anything starts."""

    servers: list[grpc.aio.Server]
    port: int
    monitor: HealthMonitor
    http: HttpFace | None
    probe: ProbeListener | None
    heartbeat: LoopHeartbeat | None
    """Beats on the event loop; the probe listener's own, or alone for metrics."""
    guard: MemoryGuard | None
    shedder: ConnectionShedder | None


def _check_addresses(options: ServeOptions) -> None:
    ports = (options.port, options.http_port, options.probe_port)
    for port in (p for p in ports if p is not None):
        problem = _bind_problem(options.host, port)
        if problem is not None:
            raise ListenError(f"cannot listen on {format_address(options.host, port)}: {problem}")


async def _assemble(options: ServeOptions, board: StatusBoard) -> _Assembly:
    if options.bounds is not None:
        from petsage_grpc.server._guard import limit_heap_arenas  # noqa: PLC0415

        # Before any grpc server starts its threads (docs/reliability.md, rapid reset).
        limit_heap_arenas()
    credentials = None
    if options.tls is not None:
        # Loaded only when used, like the HTTP face below: every module costs start-up
        # time and idle memory in every pod.
        from petsage_grpc.server._tls import TlsError, server_credentials  # noqa: PLC0415

        try:
            credentials = server_credentials(options.tls)
        except TlsError as error:
            raise ListenError(str(error)) from None
    monitor = HealthMonitor(board, options.checks)
    probe = heartbeat = None
    if options.probe_port is not None:
        # Check and Watch from a thread of their own: answered however busy this loop is.
        probe = ProbeListener(
            board,
            host=options.host,
            port=options.probe_port,
            stall_seconds=options.loop_stall_seconds,
            shed_lag_seconds=options.shed_lag_seconds,
            max_service_name_length=options.limits.max_service_name_length,
        )
        heartbeat = probe.heartbeat
    elif options.http_port is not None:
        # For the loop-lag metric and /livez?verbose; a server without either runs no timer.
        heartbeat = LoopHeartbeat(
            board,
            stall_seconds=options.loop_stall_seconds,
            shed_lag_seconds=options.shed_lag_seconds,
        )
    guard = shedder = None
    if options.bounds is not None:
        from petsage_grpc.server._guard import MemoryGuard  # noqa: PLC0415
        from petsage_grpc.server._shedder import ConnectionShedder  # noqa: PLC0415

        guard = MemoryGuard(
            budget_mib=options.bounds.budget_mib, watermark_mib=options.bounds.watermark_mib
        )
        # What grpc core lets one client hold and gives no way to close: closed by the
        # kernel (docs/reliability.md, "Closing connections grpc core keeps").
        shedder = ConnectionShedder(
            max_per_address=options.bounds.max_grpc_connections_per_address,
            memory_high_bytes=options.bounds.budget_mib * 2**20 * 8 // 10,
            max_connections=options.bounds.max_grpc_connections,
        )
    metrics = http = None
    if options.http_port is not None:
        # aiohttp and prometheus-client cost a quarter of a second to import and memory
        # to hold: only for servers that serve HTTP.
        from petsage_grpc.server._http import HttpFace, HttpLimits  # noqa: PLC0415
        from petsage_grpc.server._metrics import Metrics  # noqa: PLC0415

        metrics = Metrics(
            board,
            monitor,
            heartbeat=heartbeat,
            closed_connections=None if shedder is None else shedder.counts,
        )
        http = HttpFace(
            board,
            metrics=metrics,
            auth=None if options.auth_token is None else BearerToken(options.auth_token),
            monitor=monitor,
            report_checks=options.report_checks,
            heartbeat=heartbeat,
            limits=HttpLimits(access_log=options.http_access_log),
        )
    interceptors: list[grpc.aio.ServerInterceptor] = []
    server_options = SERVER_OPTIONS
    if options.bounds is not None:
        # grpc core keeps the first of two options with one name: the budget's caps
        # replace SERVER_OPTIONS' ones, not follow them.
        server_options = tuple(
            {**dict(SERVER_OPTIONS), **dict(options.bounds.grpc_options())}.items()
        )
    if metrics is not None:
        interceptors.append(metrics.interceptor)
    # The budget's caps belong to the main server; the probe listener keeps its own.
    server = grpc.aio.server(
        options=server_options,
        interceptors=interceptors or None,
        # Calls until done, not only until their message: a zero-window reader's.
        maximum_concurrent_rpcs=(options.bounds.max_calls_in_flight or None)
        if options.bounds is not None
        else None,
    )
    add_to_server(
        server,
        board=board,
        limits=options.limits,
        report_checks=options.report_checks,
        auth_token=options.auth_token,
        protect_reflection=options.protect_reflection,
        admit_watch=None if guard is None else guard.admits_watch,
    )
    address = format_address(options.host, options.port)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        # Lost a race for a port since the check above; grpc has logged the details.
        await server.stop(None)
        raise ListenError(f"cannot listen on {address}") from None
    return _Assembly(
        servers=[server],
        port=port,
        monitor=monitor,
        http=http,
        probe=probe,
        heartbeat=heartbeat,
        guard=guard,
        shedder=shedder,
    )


async def serve(
    options: ServeOptions,
    *,
    board: StatusBoard | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Run the server until SIGTERM or SIGINT, then stop gracefully and return.

    A second signal cuts the drain and grace periods short.

    Raises:
        ListenError: an address cannot be listened on, or the TLS files are unusable;
            nothing is left running.
    """
    _check_addresses(options)
    board = StatusBoard() if board is None else board
    parts = await _assemble(options, board)
    async with contextlib.AsyncExitStack() as stack:
        signals = stack.enter_context(_Signals())
        if parts.probe is not None:
            # First in, so last out: the probe listener stops after the servers. Stopping
            # one that never started does nothing.
            stack.push_async_callback(parts.probe.stop, 0)
        for each in parts.servers:
            stack.push_async_callback(each.stop, None)
        # Before the first answer, so that readiness already follows the checks.
        await parts.monitor.start()
        stack.push_async_callback(parts.monitor.stop)
        await _start_probe_listener(parts, options, stack)
        for each in parts.servers:
            await each.start()
        if parts.guard is not None:
            parts.guard.start()
            stack.push_async_callback(parts.guard.stop)
        if parts.shedder is not None:
            parts.shedder.start(port=parts.port)
            stack.callback(parts.shedder.stop)
        if parts.http is not None and options.http_port is not None:
            try:
                await parts.http.start(options.host, options.http_port)
            except OSError as error:
                address = format_address(options.host, options.http_port)
                raise ListenError(
                    f"cannot listen on {address}: {error.strerror or error}"
                ) from None
            stack.push_async_callback(parts.http.stop)
        bound = format_address(options.host, parts.port)
        _log.info(
            "serving on %s%s",
            bound,
            " with TLS" if options.tls is not None else "",
            extra={"event": "started", "address": bound, "port": parts.port},
        )
        if parts.probe is not None:
            _log.info(
                "serving health probes in plaintext on port %d",
                parts.probe.port,
                extra={"event": "probe_port", "port": parts.probe.port},
            )
        if on_listening is not None:
            on_listening(parts.port)
        if options.config_path is not None:
            from petsage_grpc.server._reload import ConfigReloader  # noqa: PLC0415

            signals.reloader = ConfigReloader(options.config_path, parts.monitor)
            if options.config_poll_seconds > 0:
                polling = asyncio.create_task(signals.reloader.poll(options.config_poll_seconds))
                stack.callback(polling.cancel)
        # What start-up allocated lives as long as the process: keep it out of every
        # later collection.
        gc.freeze()
        await signals.stop.wait()
        # A full collection can take tens of milliseconds under load; none must land
        # between SIGTERM and every watcher hearing NOT_SERVING. The drain is short.
        gc.disable()
        try:
            await graceful_stop(
                parts.servers,
                board,
                drain_seconds=options.drain_seconds,
                grace_seconds=options.grace_seconds,
                hurry=signals.hurry,
                probe_listener=parts.probe,
            )
        finally:
            gc.enable()
    _log.info("stopped", extra={"event": "stopped"})


async def _start_probe_listener(
    parts: _Assembly, options: ServeOptions, stack: contextlib.AsyncExitStack
) -> None:
    """Start the probe listener (with its heartbeat), or the heartbeat alone if there is one."""
    if parts.probe is not None:
        try:
            await parts.probe.start()
        except OSError:
            address = format_address(options.host, options.probe_port or 0)
            raise ListenError(f"cannot listen on {address}") from None
    elif parts.heartbeat is not None:
        parts.heartbeat.start()
        stack.push_async_callback(parts.heartbeat.stop)


class _Signals:
    """SIGTERM/SIGINT (stop; a second one hurries) and SIGHUP (reload), from the very start.

    Installed before anything listens, so that a signal sent as soon as the server is up
    is never met by Python's default action (which would skip the graceful stop).
    """

    _NAMES = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.reloader: ConfigReloader | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> _Signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._on_stop, signum)
        self._loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum in self._NAMES:
            with contextlib.suppress(ValueError, RuntimeError):
                self._loop.remove_signal_handler(signum)

    def _on_stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            _log.info("%s again: stopping now", name, extra={"event": "hurry"})
            self.hurry.set()
        else:
            _log.info("%s received", name, extra={"event": "signal"})
            self.stop.set()

    def _on_hangup(self) -> None:
        if self.reloader is None:
            _log.warning("SIGHUP received, but there is no configuration file to reload")
            return
        _log.info("SIGHUP received: reloading the configuration", extra={"event": "signal"})
        task = asyncio.create_task(self.reloader.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
