"""Registering method handlers on a grpc.aio server, the way generated stubs do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

__all__ = ["register_service"]


def register_service(
    server: grpc.aio.Server, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
) -> None:
    """Register *handlers* (method name to handler) for the fully-qualified *service*."""
    handlers = dict(handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    # Registered methods skip grpcio's per-call generic handler lookup.
    server.add_registered_method_handlers(service, handlers)
