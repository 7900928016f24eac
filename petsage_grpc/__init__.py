"""The PetSage gRPC health service.

``grpc.health.v1.Health`` (Check, Watch, List), ``petsage.v1.SmokeTestService`` and
server reflection, all answering from one :class:`StatusBoard`, which a
:class:`HealthMonitor` keeps in line with the dependencies (:class:`Check`). Embed them
in your own ``grpc.aio`` server with :func:`add_to_server`, or run ``petsage-grpc serve``.

Names are loaded on first use, so that ``petsage-grpc probe`` (which imports this
package) starts without loading the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petsage_grpc._check import CHECK_PREFIX, Check, CheckError
    from petsage_grpc._drain import graceful_stop
    from petsage_grpc._embed import add_to_server
    from petsage_grpc._health import HealthLimits
    from petsage_grpc._monitor import CheckState, HealthMonitor
    from petsage_grpc._server import SERVER_OPTIONS, ListenError, ServeOptions, serve
    from petsage_grpc._status import (
        LIVENESS,
        OVERALL,
        READINESS,
        SMOKE_TEST_SERVICE,
        STARTUP,
        ServingStatus,
        StatusBoard,
    )

__all__ = [
    "CHECK_PREFIX",
    "LIVENESS",
    "OVERALL",
    "READINESS",
    "SERVER_OPTIONS",
    "SMOKE_TEST_SERVICE",
    "STARTUP",
    "Check",
    "CheckError",
    "CheckState",
    "HealthLimits",
    "HealthMonitor",
    "ListenError",
    "ServeOptions",
    "ServingStatus",
    "StatusBoard",
    "add_to_server",
    "graceful_stop",
    "serve",
]

_HOMES = {
    "CHECK_PREFIX": "_check",
    "Check": "_check",
    "CheckError": "_check",
    "CheckState": "_monitor",
    "HealthLimits": "_health",
    "HealthMonitor": "_monitor",
    "graceful_stop": "_drain",
    "add_to_server": "_embed",
    "ListenError": "_server",
    "SERVER_OPTIONS": "_server",
    "ServeOptions": "_server",
    "serve": "_server",
    "LIVENESS": "_status",
    "OVERALL": "_status",
    "READINESS": "_status",
    "SMOKE_TEST_SERVICE": "_status",
    "STARTUP": "_status",
    "ServingStatus": "_status",
    "StatusBoard": "_status",
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
