"""One memory budget for the standalone server, and every per-client cap derived from it.

The arithmetic (docs/reliability.md, "Memory budget"): a started server with the HTTP
face holds about 55 MiB; :data:`BASELINE_MIB` keeps 64 for it. Of the rest, Watch
streams get 60 % at 24 KiB each, gRPC connections 15 % at 16 KiB, calls waiting for
their request message 5 % at 24 KiB, and 20 % is left for what is in flight (requests
being parsed, responses being written, the allocator's slack).

Every HTTP/2 stream a client opens costs grpc core ~18 KiB, whether or not the
application ever sees the call, so what one connection may open is the budget's too:
the Watch cap per connection is a 16th of the cap in all (100 at least, 1,000 at most)
and a connection may open 20 streams more than that. 16 connections then hold no more
streams than the Watch share has room for (before, 1,100 per connection: 16 connections
held 17,600 calls, 300 MiB). A watermark at 90 % of the
budget refuses new Watch streams and gives freed memory back to the system
(:mod:`petsage_grpc.server._guard`).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Final

__all__ = ["BASELINE_MIB", "DEFAULT_BUDGET_MIB", "Bounds", "derive_bounds"]

DEFAULT_BUDGET_MIB: Final = 128
"""deploy/kubernetes.yaml's memory limit (128Mi); a test keeps the two equal."""
BASELINE_MIB: Final = 64
"""A started server with the HTTP face, warmed, with room (measured: 52-56 MiB)."""
WATCH_STREAM_KIB: Final = 24
"""RSS per open Watch stream, mostly grpc core's call state (docs/benchmarks.md: 23-24)."""
WAITING_CALL_KIB: Final = 24
"""RSS per call held before its request message (measured: ~23.5 KiB)."""
GRPC_CONNECTION_KIB: Final = 16
"""RSS per open, idle gRPC connection (measured: 300 connections, 5 MiB)."""
FD_RESERVE: Final = 64
"""File descriptors never handed to clients: logs, config reloads, dependency checks."""
HTTP_CONNECTIONS: Final = 512
"""The HTTP face's cap (HttpLimits.max_connections)."""
IN_FLIGHT_CALL_KIB: Final = 36
"""RSS per unary call held until done, its answer unsent (zero-window readers: 2,320 held
calls took 80 MiB, ~35 KiB each)."""
CONNECTION_HEADROOM: Final = 0.25
"""grpc core's connection cap is this much above the shedder's, so that a new probe is
accepted (and the crowded address's newest closed) while the port is full and closed
connections reconnect at once (with 32 more, under contention 0-1 of 10 probes got in)."""
STREAM_WINDOW_BYTES: Final = 64 * 1024
"""Bytes a stream may send the server before it reads them: four of the largest request
(16 KiB; grpc core's window grows to 4 MiB per stream with BDP probing)."""


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """The caps of one standalone server, derived from its memory budget."""

    budget_mib: int
    max_watch_streams: int
    max_watch_streams_per_connection: int
    max_calls_awaiting_request: int
    max_grpc_connections: int
    max_grpc_connections_per_address: int
    max_streams_per_connection: int
    watermark_mib: int
    max_calls_in_flight: int = 0
    """Calls of every kind until done (``maximum_concurrent_rpcs``); 0: no cap."""

    def grpc_options(self) -> tuple[tuple[str, int], ...]:
        """Channel arguments for the main server's ``grpc.aio.server`` (after SERVER_OPTIONS)."""
        return (
            # Calls grpc core holds before the application takes them: a reconnect burst
            # of every Watch stream the budget holds fits under the soft limit (above it
            # grpc core refuses some at random, above the hard one all), and a rapid-reset
            # flood queues no more than the budget holds.
            ("grpc.server.max_pending_requests", self.max_watch_streams),
            (
                "grpc.server.max_pending_requests_hard_limit",
                self.max_watch_streams + self.max_calls_awaiting_request,
            ),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            # Beyond it grpc core closes a new connection as soon as it is accepted, unseen;
            # the shedder's cap (max_grpc_connections) is below it and is seen.
            (
                "grpc.max_allowed_incoming_connections",
                int(self.max_grpc_connections * (1 + CONNECTION_HEADROOM)),
            ),
            # Bytes accepted but not read: no BDP probing (it grows every stream's window
            # to 4 MiB), a fixed window per stream instead.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        )


def _open_files_limit() -> int:
    """RLIMIT_NOFILE, raised to its hard limit first (allowed without privileges)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def derive_bounds(
    budget_mib: int,
    *,
    max_watch_streams: int | None = None,
    max_watch_streams_per_connection: int | None = None,
    max_connections_per_address: int | None = None,
) -> Bounds:
    """The caps that keep a server inside *budget_mib* MiB (explicit caps win).

    Raises:
        ValueError: the budget is below what a started server needs.
    """
    if budget_mib < BASELINE_MIB + 16:
        raise ValueError(f"memory budget must be at least {BASELINE_MIB + 16} MiB")
    spare_kib = (budget_mib - BASELINE_MIB) * 1024
    watch = max_watch_streams or max(100, int(spare_kib * 0.6) // WATCH_STREAM_KIB)
    per_connection = max_watch_streams_per_connection or max(100, min(1_000, watch // 16))
    waiting = max(100, int(spare_kib * 0.05) // WAITING_CALL_KIB)
    connections = max(64, int(spare_kib * 0.15) // GRPC_CONNECTION_KIB)
    # Descriptors: the gRPC and HTTP caps, plus a reserve, fit under the process limit,
    # so that accept() never fails with EMFILE and a probe can always connect.
    # grpc core's own cap, above this one, too.
    descriptors = _open_files_limit() - HTTP_CONNECTIONS - FD_RESERVE
    connections = min(connections, int(descriptors / (1 + CONNECTION_HEADROOM)))
    return Bounds(
        budget_mib=budget_mib,
        max_watch_streams=watch,
        max_watch_streams_per_connection=per_connection,
        max_calls_awaiting_request=waiting,
        max_grpc_connections=max(16, connections),
        max_grpc_connections_per_address=max_connections_per_address or max(16, connections // 8),
        # The Watch cap per connection and room for unary calls beside it; beyond it the
        # client waits for a stream (HTTP/2 flow of MAX_CONCURRENT_STREAMS).
        max_streams_per_connection=per_connection + 20,
        watermark_mib=budget_mib * 9 // 10,
        # Calls of every kind until done: a zero-window reader holds each unary call it
        # makes until its connection goes, at ~36 KiB. Every Watch stream and waiting call
        # the budget holds, but never more such calls than 90 % of the spare memory holds.
        max_calls_in_flight=min(watch + waiting, int(spare_kib * 0.9) // IN_FLIGHT_CALL_KIB),
    )
