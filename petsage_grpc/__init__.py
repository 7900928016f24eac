"""The PetSage gRPC health service.

``grpc.health.v1.Health`` (Check, Watch, List), ``petsage.v1.SmokeTestService`` and
server reflection, all answering from one :class:`StatusBoard`, which a
:class:`HealthMonitor` keeps in line with the dependencies (:class:`Check`). Embed them
in your own ``grpc.aio`` server with :func:`add_to_server` (with the budgeted options of
:func:`server_options` and :func:`derive_bounds`), or run :func:`serve` /
``petsage-grpc serve``, one and the same server.

Names are loaded on first use, so that ``petsage-grpc probe`` (which imports this
package) starts without loading the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petsage_grpc._extras import MissingExtraError
    from petsage_grpc.board._check import CHECK_PREFIX, Check, CheckError
    from petsage_grpc.board._monitor import CheckState, HealthMonitor
    from petsage_grpc.board._status import (
        LIVENESS,
        OVERALL,
        READINESS,
        SMOKE_TEST_SERVICE,
        STARTUP,
        ServingStatus,
        StatusBoard,
    )
    from petsage_grpc.server._budget import Bounds, BudgetError, MemoryBudget, derive_bounds
    from petsage_grpc.server._process import tune_process
    from petsage_grpc.server._server import (
        SERVER_OPTIONS,
        ListenError,
        ServeOptions,
        serve,
        server_options,
    )
    from petsage_grpc.services._drain import graceful_stop
    from petsage_grpc.services._embed import add_to_server
    from petsage_grpc.services._health import HealthLimits
    from petsage_grpc.services._probe_listener import ProbeListener

__all__ = [
    "CHECK_PREFIX",
    "LIVENESS",
    "OVERALL",
    "READINESS",
    "SERVER_OPTIONS",
    "SMOKE_TEST_SERVICE",
    "STARTUP",
    "Bounds",
    "BudgetError",
    "Check",
    "CheckError",
    "CheckState",
    "HealthLimits",
    "HealthMonitor",
    "ListenError",
    "MemoryBudget",
    "MissingExtraError",
    "ProbeListener",
    "ServeOptions",
    "ServingStatus",
    "StatusBoard",
    "add_to_server",
    "derive_bounds",
    "graceful_stop",
    "serve",
    "server_options",
    "tune_process",
]

_HOMES = {
    "CHECK_PREFIX": "board._check",
    "Check": "board._check",
    "CheckError": "board._check",
    "CheckState": "board._monitor",
    "HealthLimits": "services._health",
    "HealthMonitor": "board._monitor",
    "graceful_stop": "services._drain",
    "add_to_server": "services._embed",
    "Bounds": "server._budget",
    "BudgetError": "server._budget",
    "MemoryBudget": "server._budget",
    "derive_bounds": "server._budget",
    "tune_process": "server._process",
    "server_options": "server._server",
    "ListenError": "server._server",
    "MissingExtraError": "_extras",
    "ProbeListener": "services._probe_listener",
    "SERVER_OPTIONS": "server._server",
    "ServeOptions": "server._server",
    "serve": "server._server",
    "LIVENESS": "board._status",
    "OVERALL": "board._status",
    "READINESS": "board._status",
    "SMOKE_TEST_SERVICE": "board._status",
    "STARTUP": "board._status",
    "ServingStatus": "board._status",
    "StatusBoard": "board._status",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
