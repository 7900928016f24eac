"""One memory budget for the server, and every per-client cap derived from it.

The arithmetic and the figures behind it: docs/reliability.md, "The memory budget".
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from petsage_grpc.services._health import HealthLimits

__all__ = [
    "BASELINE_MIB",
    "DEFAULT_BUDGET_MIB",
    "MIN_BUDGET_MIB",
    "Bounds",
    "BudgetError",
    "MemoryBudget",
    "derive_bounds",
    "resolve_budget",
]

DEFAULT_BUDGET_MIB: Final = 128
"""The budget where the container sets no memory limit."""
MIN_BUDGET_MIB: Final = 48
"""Below this a started server (38-40 MiB without the HTTP face) has no room for clients."""
BASELINE_MIB: Final = 64
"""Kept for the server itself: a started server with the HTTP face, warmed, with room.
Budgets under 74 MiB keep 7/8 of themselves instead."""
WATCH_STREAM_KIB: Final = 24
"""RSS per open Watch stream, mostly grpc core's call state."""
WAITING_CALL_KIB: Final = 24
"""RSS per call held before its request message."""
GRPC_CONNECTION_KIB: Final = 16
"""RSS per open, idle gRPC connection."""
FD_RESERVE: Final = 64
"""File descriptors never handed to clients: logs, config reloads, dependency checks."""
HTTP_CONNECTIONS: Final = 512
"""The HTTP face's cap (HttpLimits.max_connections)."""
WATERMARK_PERCENT: Final = 90
"""Above this share of the budget new Watch streams are refused (the memory guard)."""
RELEASE_PERCENT: Final = 80
"""Under this share Watch streams are admitted again; above it the connection shedder
closes any connection that receives fast."""


class BudgetError(ValueError):
    """The memory budget is below what a started server needs."""


BudgetSource = Literal["configured", "container", "default"]


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget in MiB and where it came from.

    *source*: ``configured`` (given by the caller: option, flag, environment, file),
    ``container`` (the cgroup's memory limit, *detail* names the file) or ``default``
    (no limit found: :data:`DEFAULT_BUDGET_MIB`).
    """

    mib: int
    source: BudgetSource
    detail: str = ""

    def describe(self) -> str:
        """A few words for the start-up line: ``the container's limit (cgroup v1 ...)``."""
        if self.source == "configured":
            return "as configured"
        if self.source == "container":
            return f"the container's limit ({self.detail})"
        return "the default: no container memory limit found"


def resolve_budget(mib: int | None = None) -> MemoryBudget:
    """*mib* if given, else the container's memory limit, else :data:`DEFAULT_BUDGET_MIB`.

    Never raises; :func:`derive_bounds` judges whether the budget is enough.
    """
    if mib is not None:
        return MemoryBudget(mib, "configured")
    from petsage_grpc.server._cgroup import container_memory_limit  # noqa: PLC0415

    limit = container_memory_limit()
    if limit is None:
        return MemoryBudget(DEFAULT_BUDGET_MIB, "default")
    return MemoryBudget(limit.limit_bytes >> 20, "container", limit.source)


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """The caps of one server, derived from its memory budget (:func:`derive_bounds`)."""

    budget: MemoryBudget
    max_watch_streams: int
    max_watch_streams_per_connection: int
    max_calls_awaiting_request: int
    max_grpc_connections: int
    max_grpc_connections_per_address: int
    max_streams_per_connection: int
    watermark_mib: int

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
            # Beyond it grpc core closes a new connection as soon as it is accepted.
            ("grpc.max_allowed_incoming_connections", self.max_grpc_connections),
        )

    @property
    def budget_mib(self) -> int:
        """The budget, in MiB."""
        return self.budget.mib

    @property
    def release_mib(self) -> int:
        """Memory under which Watch streams are admitted again (see :data:`RELEASE_PERCENT`)."""
        return self.budget.mib * RELEASE_PERCENT // 100

    def health_limits(self, base: HealthLimits | None = None) -> HealthLimits:
        """*base* (HealthLimits' defaults if None) with the budget's Watch and waiting-call caps."""
        import dataclasses  # noqa: PLC0415

        from petsage_grpc.services._health import HealthLimits  # noqa: PLC0415

        return dataclasses.replace(
            base or HealthLimits(),
            max_watch_streams=self.max_watch_streams,
            max_watch_streams_per_connection=self.max_watch_streams_per_connection,
            max_calls_awaiting_request=self.max_calls_awaiting_request,
        )


def _open_files_limit() -> int:
    """The soft RLIMIT_NOFILE as it is now (raising it is the process set-up's job)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def derive_bounds(
    budget_mib: int | MemoryBudget | None = None,
    *,
    max_watch_streams: int | None = None,
    max_watch_streams_per_connection: int | None = None,
    max_connections_per_address: int | None = None,
) -> Bounds:
    """The caps that keep a server inside its memory budget (explicit caps win).

    *budget_mib*: MiB, or a :class:`MemoryBudget`; None reads the container's memory
    limit (:func:`resolve_budget`). The connection cap also stays under the process's
    current open-files limit, less the HTTP face's cap and a reserve.

    Raises:
        BudgetError: the budget is below :data:`MIN_BUDGET_MIB` (a ValueError).
    """
    budget = budget_mib if isinstance(budget_mib, MemoryBudget) else resolve_budget(budget_mib)
    mib = budget.mib
    if mib < MIN_BUDGET_MIB:
        where = "" if budget.source == "configured" else f" ({budget.describe()})"
        raise BudgetError(f"memory budget must be at least {MIN_BUDGET_MIB} MiB, not {mib}{where}")
    # Small budgets keep 7/8 of themselves for the server (docs/reliability.md).
    spare_kib = (mib - min(BASELINE_MIB, mib - mib // 8)) * 1024
    watch = max_watch_streams or max(100, int(spare_kib * 0.6) // WATCH_STREAM_KIB)
    per_connection = max_watch_streams_per_connection or max(100, min(1_000, watch // 16))
    waiting = max(100, int(spare_kib * 0.05) // WAITING_CALL_KIB)
    connections = max(64, int(spare_kib * 0.15) // GRPC_CONNECTION_KIB)
    # Descriptors: the gRPC and HTTP caps, plus a reserve, fit under the process limit,
    # so that accept() never fails with EMFILE and a probe can always connect.
    connections = min(connections, _open_files_limit() - HTTP_CONNECTIONS - FD_RESERVE)
    return Bounds(
        budget=budget,
        max_watch_streams=watch,
        max_watch_streams_per_connection=per_connection,
        max_calls_awaiting_request=waiting,
        max_grpc_connections=max(16, connections),
        max_grpc_connections_per_address=max_connections_per_address or max(16, connections // 8),
        # The Watch cap per connection and room for unary calls beside it; beyond it the
        # client waits for a stream (HTTP/2 flow of MAX_CONCURRENT_STREAMS).
        max_streams_per_connection=per_connection + 20,
        watermark_mib=mib * WATERMARK_PERCENT // 100,
    )
