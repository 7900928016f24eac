"""Server reflection under both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection serves only v1alpha, while grpcurl >= 1.8.8 and other tools ask for v1
first. The two protocols are wire-identical (same messages, fields and numbers; only the
package differs), so one grpcio-reflection servicer answers both. So that clients can
also *describe* the v1 service, its file descriptor is derived once from v1alpha's and
added to the default descriptor pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from petsage_grpc._auth import UNAUTHENTICATED_DETAILS, BearerToken
from petsage_grpc._registration import register_service

__all__ = ["REFLECTION_SERVICES", "add_reflection_service"]

_V1ALPHA_PACKAGE: Final = reflection_pb2.DESCRIPTOR.package
_V1_PACKAGE: Final = "grpc.reflection.v1"
_SERVICE: Final = "ServerReflection"
REFLECTION_SERVICES: Final = (f"{_V1_PACKAGE}.{_SERVICE}", f"{_V1ALPHA_PACKAGE}.{_SERVICE}")


def _ensure_v1_descriptor() -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to the default pool, derived from v1alpha."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        pass
    else:
        return
    proto = FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = name
    proto.package = _V1_PACKAGE
    old_prefix, new_prefix = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = new_prefix + field.type_name.removeprefix(old_prefix)
    for service in proto.service:
        for method in service.method:
            method.input_type = new_prefix + method.input_type.removeprefix(old_prefix)
            method.output_type = new_prefix + method.output_type.removeprefix(old_prefix)
    proto.ClearField("options")
    pool.AddSerializedFile(proto.SerializeToString())


_Behaviour = Callable[[Any, Any], AsyncIterable[Any]]


def _guarded(behaviour: _Behaviour, auth: BearerToken | None) -> _Behaviour:
    """Check the token first, then parse each request here.

    grpcio would answer a malformed request with UNKNOWN and its exception text, and
    log a traceback for it.
    """

    async def guarded(
        requests: AsyncIterable[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        if auth is not None and not auth.allows(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

        async def parsed() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for raw in requests:
                try:
                    yield reflection_pb2.ServerReflectionRequest.FromString(raw)
                except DecodeError:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "malformed ServerReflectionRequest"
                    )

        async for response in behaviour(parsed(), context):
            yield response

    return guarded


def add_reflection_service(
    server: grpc.aio.Server, service_names: Iterable[str], *, auth: BearerToken | None = None
) -> None:
    """Serve reflection (v1 and v1alpha) on *server*, listing *service_names* and itself.

    With *auth*, every reflection call requires the bearer token (UNAUTHENTICATED
    otherwise). A request that does not parse ends the call with INVALID_ARGUMENT.
    """
    _ensure_v1_descriptor()
    listed = sorted({*service_names, *REFLECTION_SERVICES})
    servicer = ReflectionServicer(listed)
    handler: grpc.RpcMethodHandler[bytes, Any] = grpc.stream_stream_rpc_method_handler(
        _guarded(servicer.ServerReflectionInfo, auth),
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in REFLECTION_SERVICES:
        register_service(server, service, {"ServerReflectionInfo": handler})
