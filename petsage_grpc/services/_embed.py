"""Adding the PetSage services to a grpc.aio server: the library's one entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc

from petsage_grpc.board._status import SMOKE_TEST_SERVICE, StatusBoard
from petsage_grpc.services._auth import BearerToken
from petsage_grpc.services._health import HEALTH_SERVICE, HealthLimits, add_health_service
from petsage_grpc.services._reflection import add_reflection_service
from petsage_grpc.services._smoke_test import add_smoke_test_service

__all__ = ["add_to_server"]


def add_to_server(
    server: grpc.aio.Server,
    *,
    board: StatusBoard | None = None,
    reflection: bool = True,
    reflected_services: Iterable[str] = (),
    limits: HealthLimits | None = None,
    report_checks: bool = True,
    auth_token: str | None = None,
    protect_reflection: bool = True,
    admit_watch: Callable[[], bool] | None = None,
) -> StatusBoard:
    """Add ``grpc.health.v1.Health``, ``petsage.v1.SmokeTestService`` and reflection to *server*.

    Call it before ``server.start()``. All services answer from the returned board:
    set your own services' statuses on it, and call :func:`petsage_grpc.graceful_stop`
    to stop the server the way Kubernetes expects.

    Args:
        server: The application's ``grpc.aio.Server``.
        board: The status board to answer from; a new one (``""``, ``liveness``,
            ``readiness``, ``startup`` and ``petsage.v1.SmokeTestService``, all
            SERVING) if None.
        reflection: Also serve ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.
            Pass False if the application registers reflection itself.
        reflected_services: The application's own fully-qualified service names, to
            list through reflection beside Health, SmokeTestService and reflection.
        limits: Caps on List size, service name length, open Watch streams and calls
            waiting for their request message (:class:`HealthLimits` defaults if None).
        report_checks: A serving SmokeTest answer lists each dependency check by name
            and state (never targets or errors). False lists none, hiding even names.
        auth_token: A bearer token that List, SmokeTest's per-check detail and (with
            *protect_reflection*) reflection require as ``authorization: Bearer <token>``.
            Check and Watch never require it. None: nothing requires a token.
        protect_reflection: With *auth_token*, reflection requires it too.
        admit_watch: Asked before each new Watch stream, beyond *limits*; False refuses
            the stream with RESOURCE_EXHAUSTED (the standalone server refuses them while
            its memory is above the budget's watermark). None admits up to *limits*.

    For the budgeted caps the standalone server runs with, create *server* with
    ``options=petsage_grpc.server_options(bounds)`` and pass
    ``limits=bounds.health_limits()`` (*bounds* from :func:`petsage_grpc.derive_bounds`).

    Returns:
        The status board, the single source of truth for what the server reports.

    Raises:
        ValueError: *auth_token* is empty or contains whitespace.
    """
    board = StatusBoard() if board is None else board
    auth = None if auth_token is None else BearerToken(auth_token)
    limits = limits or HealthLimits()
    # One gate for the server's calls that wait for a request message, whatever the service.
    gate = limits.request_gate()
    add_health_service(
        server,
        board,
        limits=limits,
        auth=auth,
        gate=gate,
        admit_watch=admit_watch,
    )
    add_smoke_test_service(server, board, report_checks=report_checks, auth=auth, gate=gate)
    if reflection:
        add_reflection_service(
            server,
            [HEALTH_SERVICE, SMOKE_TEST_SERVICE, *reflected_services],
            auth=auth if protect_reflection else None,
            gate=gate,
        )
    return board
