"""The server: a grpc.aio server with the PetSage services, run until a signal.

``serve()`` is the one server: ``petsage-grpc serve`` only turns its flags into
:class:`ServeOptions`. Every cap comes from one memory budget (``server/_budget.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import grpc

from petsage_grpc._extras import require_extra
from petsage_grpc.board._check import Check
from petsage_grpc.board._heartbeat import DEFAULT_STALL_SECONDS, LoopHeartbeat
from petsage_grpc.board._monitor import HealthMonitor
from petsage_grpc.board._status import StatusBoard
from petsage_grpc.server._budget import Bounds, derive_bounds
from petsage_grpc.server._process import NativeStderr, Platform, platform, tune_process
from petsage_grpc.services._auth import BearerToken
from petsage_grpc.services._drain import graceful_stop
from petsage_grpc.services._embed import add_to_server
from petsage_grpc.services._health import HealthLimits
from petsage_grpc.services._probe_listener import ProbeListener

__all__ = [
    "SERVER_OPTIONS",
    "ListenError",
    "ServeOptions",
    "format_address",
    "serve",
    "server_options",
]

if TYPE_CHECKING:
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
"""grpc.aio server options for a health server, before the budget's caps
(:func:`server_options` merges them)."""


def server_options(bounds: Bounds) -> tuple[tuple[str, int], ...]:
    """SERVER_OPTIONS with the budget's caps in place: what ``serve()`` gives grpc.aio.

    For an embedding application's own ``grpc.aio.server(options=...)``; *bounds* from
    :func:`petsage_grpc.derive_bounds`. grpc core keeps the first of two options with
    one name, so the budget's values replace SERVER_OPTIONS' ones rather than follow them.
    """
    return tuple({**dict(SERVER_OPTIONS), **dict(bounds.grpc_options())}.items())


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """How the server listens, what its memory budget is, and how it stops."""

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
    memory_budget_mib: int | None = None
    """Memory the server must stay within, in MiB; every cap is derived from it
    (:func:`petsage_grpc.derive_bounds`). None: the container's memory limit (cgroup v2
    ``memory.max``, v1 ``memory.limit_in_bytes``), or 128 where there is none."""
    max_watch_streams: int | None = None
    """Open Watch streams in all; None: from the budget."""
    max_watch_streams_per_connection: int | None = None
    """Open Watch streams on one connection; None: from the budget."""
    max_connections_per_address: int | None = None
    """gRPC connections from one peer address before its newest are closed; None: from
    the budget."""
    shed_connections: bool = True
    """Close connections over the per-address cap and floods from the side (Linux)."""
    tune_process: bool = True
    """Make the process-wide changes of a server that owns its process (open-files limit,
    malloc arenas, gc freeze after start-up, grpc core's log lines off after start-up);
    each is logged. False leaves the process as it is."""
    limits: HealthLimits | None = None
    """List size, service name length and request timeout; its Watch and waiting-call caps
    replace the budget's. None: HealthLimits' defaults with the budget's caps."""
    checks: tuple[Check, ...] = ()
    """Dependency checks that readiness follows."""
    report_checks: bool = True
    """SmokeTest lists each check's name and state."""
    config_path: str | None = None
    """The configuration file that SIGHUP re-reads (its checks change without a restart)."""
    config_poll_seconds: float = 0.0
    """Also re-read the configuration file when it changes, looking this often; 0: off."""
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

    server: grpc.aio.Server
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


def _bounds(options: ServeOptions) -> Bounds:
    """Every cap of this server, from its one budget (the caps given explicitly win)."""
    return derive_bounds(
        options.memory_budget_mib,
        max_watch_streams=options.max_watch_streams,
        max_watch_streams_per_connection=options.max_watch_streams_per_connection,
        max_connections_per_address=options.max_connections_per_address,
    )


def _defences(
    options: ServeOptions, bounds: Bounds, found: Platform
) -> tuple[MemoryGuard | None, ConnectionShedder | None]:
    """The memory guard and the connection shedder, where this platform has what they need."""
    guard = shedder = None
    if found.proc:
        from petsage_grpc.server._guard import MemoryGuard  # noqa: PLC0415

        guard = MemoryGuard(
            budget_mib=bounds.budget_mib,
            watermark_mib=bounds.watermark_mib,
            release_mib=bounds.release_mib,
            give_back=found.glibc,
        )
    if options.shed_connections and found.proc and found.tcp_info:
        from petsage_grpc.server._shedder import ConnectionShedder  # noqa: PLC0415

        # What grpc core lets one client hold and gives no way to close: closed by the
        # kernel (docs/reliability.md, "Closing connections grpc core keeps").
        shedder = ConnectionShedder(
            max_per_address=bounds.max_grpc_connections_per_address,
            memory_high_bytes=bounds.release_mib * 2**20,
        )
    return guard, shedder


async def _assemble(
    options: ServeOptions, board: StatusBoard, bounds: Bounds, found: Platform
) -> _Assembly:
    credentials = None
    if options.tls is not None:
        # Loaded only when used, like the HTTP face below: every module costs start-up
        # time and idle memory in every pod.
        from petsage_grpc.server._tls import TlsError, server_credentials  # noqa: PLC0415

        try:
            credentials = server_credentials(options.tls)
        except TlsError as error:
            raise ListenError(str(error)) from None
    limits = bounds.health_limits() if options.limits is None else options.limits
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
            max_service_name_length=limits.max_service_name_length,
        )
        heartbeat = probe.heartbeat
    elif options.http_port is not None:
        # For the loop-lag metric and /livez?verbose; a server without either runs no timer.
        heartbeat = LoopHeartbeat(
            board,
            stall_seconds=options.loop_stall_seconds,
            shed_lag_seconds=options.shed_lag_seconds,
        )
    guard, shedder = _defences(options, bounds, found)
    metrics = http = None
    if options.http_port is not None:
        # aiohttp and prometheus-client cost a quarter of a second to import and memory
        # to hold: only for servers that serve HTTP (and only installed with the extra).
        require_extra("http", feature="http_port")
        from petsage_grpc.server._http import HttpFace, HttpLimits  # noqa: PLC0415
        from petsage_grpc.server._metrics import Metrics  # noqa: PLC0415

        metrics = Metrics(
            board,
            monitor,
            heartbeat=heartbeat,
            closed_connections=None if shedder is None else shedder.counts,
            memory_budget=(bounds.budget_mib * 2**20, bounds.budget.source),
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
    if metrics is not None:
        interceptors.append(metrics.interceptor)
    # The budget's caps belong to the main server; the probe listener keeps its own.
    server = grpc.aio.server(options=server_options(bounds), interceptors=interceptors or None)
    add_to_server(
        server,
        board=board,
        limits=limits,
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
        # Lost a race for a port since the check above; grpc core's own line (logged
        # after this, as a warning) may say more.
        await server.stop(None)
        raise ListenError(f"cannot listen on {address}") from None
    return _Assembly(
        server=server,
        port=port,
        monitor=monitor,
        http=http,
        probe=probe,
        heartbeat=heartbeat,
        guard=guard,
        shedder=shedder,
    )


def _log_start_up(bounds: Bounds, process: list[str], found: Platform) -> None:
    """The budget and where it came from, the process-wide changes, the defences off."""
    budget = bounds.budget
    _log.info(
        "memory budget %d MiB, %s: %d Watch streams (%d per connection), %d gRPC "
        "connections (%d per address), watermark %d MiB",
        budget.mib,
        budget.describe(),
        bounds.max_watch_streams,
        bounds.max_watch_streams_per_connection,
        bounds.max_grpc_connections,
        bounds.max_grpc_connections_per_address,
        bounds.watermark_mib,
        extra={"event": "budget", "budget_mib": budget.mib, "source": budget.source},
    )
    _log.debug(
        "grpc options: %s",
        ", ".join(f"{name}={value}" for name, value in server_options(bounds)),
        extra={"event": "grpc_options"},
    )
    if process:
        _log.info("process set-up: %s", ", ".join(process), extra={"event": "process"})
    gaps = found.missing()
    if gaps:
        _log.warning(
            "defences off on this platform: %s; every other limit applies",
            "; ".join(gaps),
            extra={"event": "platform"},
        )


async def serve(
    options: ServeOptions,
    *,
    board: StatusBoard | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Run the server until SIGTERM or SIGINT, then stop gracefully and return.

    ``petsage-grpc serve`` is this call. Every cap comes from one memory budget
    (:attr:`ServeOptions.memory_budget_mib`; start-up logs it and where it came from).
    A second signal cuts the drain and grace periods short.

    Raises:
        ListenError: an address cannot be listened on, or the TLS files are unusable;
            nothing is left running.
        BudgetError: the memory budget is too small (a ValueError); nothing has started.
        MissingExtraError: an ``ImportError``: *http_port* or a check needs an extra
            that is not installed; nothing was started.
    """
    _check_addresses(options)
    found = platform()
    process = []
    if options.tune_process:
        process = [*tune_process(arenas=found.glibc), "gc frozen after start-up"]
    bounds = _bounds(options)
    board = StatusBoard() if board is None else board
    start_up = _StartUp(bounds, found, NativeStderr(keep_after_start=_grpc_log_asked()), process)
    if options.tune_process:
        start_up.native.capture()
    try:
        await _run(options, board, start_up, on_listening)
    finally:
        start_up.native.restore()
    _log.info("stopped", extra={"event": "stopped"})


def _grpc_log_asked() -> bool:
    """Whether the operator asked grpc core for more than errors (then its lines stay)."""
    verbosity = os.environ.get("GRPC_VERBOSITY", "").upper()
    return verbosity in {"DEBUG", "INFO"} or bool(os.environ.get("GRPC_TRACE"))


@dataclass
class _StartUp:
    """What serve() settled before assembling: the caps, the platform, the process."""

    bounds: Bounds
    found: Platform
    native: NativeStderr
    process: list[str]


async def _start(parts: _Assembly, options: ServeOptions, stack: contextlib.AsyncExitStack) -> None:
    """Start every part, each one's stop pushed on *stack* (so stopped in reverse)."""
    if parts.probe is not None:
        # First in, so last out: the probe listener stops after the server. Stopping
        # one that never started does nothing.
        stack.push_async_callback(parts.probe.stop, 0)
    stack.push_async_callback(parts.server.stop, None)
    # Before the first answer, so that readiness already follows the checks.
    await parts.monitor.start()
    stack.push_async_callback(parts.monitor.stop)
    await _start_probe_listener(parts, options, stack)
    await parts.server.start()
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
            raise ListenError(f"cannot listen on {address}: {error.strerror or error}") from None
        stack.push_async_callback(parts.http.stop)


async def _run(
    options: ServeOptions,
    board: StatusBoard,
    start_up: _StartUp,
    on_listening: Callable[[int], None] | None,
) -> None:
    parts = await _assemble(options, board, start_up.bounds, start_up.found)
    async with contextlib.AsyncExitStack() as stack:
        signals = stack.enter_context(_Signals())
        await _start(parts, options, stack)
        # Started: what grpc core said while binding is logged, its later lines are off.
        start_up.native.release()
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
        _log_start_up(start_up.bounds, start_up.process, start_up.found)
        if not options.shed_connections:
            _log.info("connection shedder off, as configured", extra={"event": "shedder_off"})
        if on_listening is not None:
            on_listening(parts.port)
        if options.config_path is not None:
            from petsage_grpc.server._reload import ConfigReloader  # noqa: PLC0415

            signals.reloader = ConfigReloader(options.config_path, parts.monitor)
            if options.config_poll_seconds > 0:
                polling = asyncio.create_task(signals.reloader.poll(options.config_poll_seconds))
                stack.callback(polling.cancel)
        if options.tune_process:
            # What start-up allocated lives as long as the process: keep it out of every
            # later collection.
            gc.freeze()
        await signals.stop.wait()
        # A full collection can take tens of milliseconds under load; none must land
        # between SIGTERM and every watcher hearing NOT_SERVING. The drain is short.
        collecting = gc.isenabled()
        if options.tune_process:
            gc.disable()
        try:
            await graceful_stop(
                parts.server,
                board,
                drain_seconds=options.drain_seconds,
                grace_seconds=options.grace_seconds,
                hurry=signals.hurry,
                probe_listener=parts.probe,
            )
        finally:
            if collecting:
                gc.enable()


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
