"""Adding the PetSage services to a grpc.aio server: the library's one entry point."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from petsage_grpc._health import DEFAULT_LIST_LIMIT, HEALTH_SERVICE, add_health_service
from petsage_grpc._reflection import add_reflection_service
from petsage_grpc._smoke_test import add_smoke_test_service
from petsage_grpc._status import SMOKE_TEST_SERVICE, StatusBoard

__all__ = ["add_to_server"]


def add_to_server(
    server: grpc.aio.Server,
    *,
    board: StatusBoard | None = None,
    reflection: bool = True,
    reflected_services: Iterable[str] = (),
    list_limit: int = DEFAULT_LIST_LIMIT,
    report_checks: bool = True,
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
        list_limit: ``Health/List`` answers RESOURCE_EXHAUSTED when the board holds more
            names than this.
        report_checks: A serving SmokeTest answer lists each dependency check by name
            and state (never targets or errors). False lists none, hiding even names.

    Returns:
        The status board, the single source of truth for what the server reports.

    Raises:
        ValueError: *list_limit* is not positive.
    """
    if list_limit < 1:
        raise ValueError(f"list_limit must be at least 1, not {list_limit}")
    board = StatusBoard() if board is None else board
    add_health_service(server, board, list_limit=list_limit)
    add_smoke_test_service(server, board, report_checks=report_checks)
    if reflection:
        add_reflection_service(server, [HEALTH_SERVICE, SMOKE_TEST_SERVICE, *reflected_services])
    return board
