"""Server reflection under both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection serves only v1alpha, while grpcurl >= 1.8.8 and other tools ask for v1
first. The two protocols are wire-identical (same messages, fields and numbers; only the
package differs), so one grpcio-reflection servicer answers both. So that clients can
also *describe* the v1 service, its file descriptor is derived once from v1alpha's and
added to the default descriptor pool.

Reflection is for people with grpcurl, not for probes: grpcio-reflection and the
descriptor machinery (about 0.7 MiB) are loaded by the first reflection call, not by
every pod at start-up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.message import DecodeError, Message

from petsage_grpc.services._auth import UNAUTHENTICATED_DETAILS, BearerToken
from petsage_grpc.services._registration import RequestGate, register_service

if TYPE_CHECKING:
    from grpc_reflection.v1alpha._async import ReflectionServicer

__all__ = ["REFLECTION_SERVICES", "add_reflection_service"]

_V1ALPHA_PACKAGE: Final = "grpc.reflection.v1alpha"
_V1_PACKAGE: Final = "grpc.reflection.v1"
_SERVICE: Final = "ServerReflection"
REFLECTION_SERVICES: Final = (f"{_V1_PACKAGE}.{_SERVICE}", f"{_V1ALPHA_PACKAGE}.{_SERVICE}")


def _ensure_v1_descriptor() -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to the default pool, derived from v1alpha."""
    from google.protobuf import descriptor_pool  # noqa: PLC0415
    from google.protobuf.descriptor_pb2 import FileDescriptorProto  # noqa: PLC0415
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: PLC0415

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


class _Reflection:
    """grpcio-reflection's servicer behind a token check and our own request parsing.

    grpcio would answer a malformed request with UNKNOWN and its exception text, and
    log a traceback for it. The servicer is built by the first call.
    """

    def __init__(self, listed: list[str], auth: BearerToken | None, gate: RequestGate) -> None:
        self._listed = listed
        self._auth = auth
        self._gate = gate
        self._servicer: ReflectionServicer | None = None

    def _loaded(self) -> ReflectionServicer:
        if self._servicer is None:
            from grpc_reflection.v1alpha._async import ReflectionServicer  # noqa: PLC0415

            _ensure_v1_descriptor()
            self._servicer = ReflectionServicer(self._listed)
        return self._servicer

    async def serve(
        self, requests: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Message]:
        if self._auth is not None and not self._auth.allows(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        from grpc_reflection.v1alpha import reflection_pb2  # noqa: PLC0415

        servicer = self._loaded()

        async def parsed() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            # Every request through the gate: a session that goes quiet without ending
            # its stream is ended, like a call that never sends its first message.
            while (raw := await self._gate.read_next(context)) is not None:
                try:
                    yield reflection_pb2.ServerReflectionRequest.FromString(raw)
                except DecodeError:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "malformed ServerReflectionRequest"
                    )

        async for response in servicer.ServerReflectionInfo(parsed(), context):
            yield response


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def add_reflection_service(
    server: grpc.aio.Server,
    service_names: Iterable[str],
    *,
    auth: BearerToken | None = None,
    gate: RequestGate,
) -> None:
    """Serve reflection (v1 and v1alpha) on *server*, listing *service_names* and itself.

    With *auth*, every reflection call requires the bearer token (UNAUTHENTICATED
    otherwise). A request that does not parse ends the call with INVALID_ARGUMENT. *gate*
    bounds the wait for each request.
    """
    reflection = _Reflection(sorted({*service_names, *REFLECTION_SERVICES}), auth, gate)
    handler: grpc.RpcMethodHandler[bytes, Message] = grpc.stream_stream_rpc_method_handler(
        reflection.serve, response_serializer=_serialize
    )
    for service in REFLECTION_SERVICES:
        register_service(server, service, {"ServerReflectionInfo": handler})
