"""Server reflection under grpc.reflection.v1 and v1alpha, used the way grpcurl uses it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

import grpc
import pytest
from conftest import InProcessServer
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from petsage_grpc import READINESS, SMOKE_TEST_SERVICE, ServingStatus

RPC_TIMEOUT: Final = 5.0

HEALTH: Final = "grpc.health.v1.Health"
REFLECTION_V1: Final = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA: Final = "grpc.reflection.v1alpha.ServerReflection"
EXPECTED_SERVICES: Final = (HEALTH, SMOKE_TEST_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA)

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse
Reflect: TypeAlias = "grpc.StreamStreamMultiCallable[Request, Response]"

REFLECTION_PACKAGES: Final = pytest.mark.parametrize(
    "reflection_service", [REFLECTION_V1, REFLECTION_V1ALPHA], ids=["v1", "v1alpha"]
)


def reflect(channel: grpc.Channel, reflection_service: str) -> Reflect:
    """ServerReflectionInfo under *reflection_service*, with v1alpha's (wire-identical) messages."""
    method: Reflect = channel.stream_stream(
        f"/{reflection_service}/ServerReflectionInfo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    return method


def ask(method: Reflect, *requests: Request) -> list[Response]:
    """Send *requests* on one reflection stream and return every response (bounded)."""
    responses = list(method(iter(requests), timeout=RPC_TIMEOUT))
    assert len(responses) == len(requests)
    for request, response in zip(requests, responses, strict=True):
        assert response.original_request == request
    return responses


def list_services(method: Reflect) -> list[str]:
    (response,) = ask(method, Request(list_services=""))
    assert response.WhichOneof("message_response") == "list_services_response"
    return [service.name for service in response.list_services_response.service]


def files_for(method: Reflect, symbol: str) -> list[FileDescriptorProto]:
    (response,) = ask(method, Request(file_containing_symbol=symbol))
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        FileDescriptorProto.FromString(serialized)
        for serialized in response.file_descriptor_response.file_descriptor_proto
    ]


def pool_from(protos: Iterable[FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A fresh pool built only from *protos* (dependencies first), as grpcurl does."""
    pending = {proto.name: proto for proto in protos}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while pending:
        ready = [p for p in pending.values() if set(p.dependency) <= added]
        assert ready, f"unresolvable dependencies among {sorted(pending)}"
        for proto in ready:
            pool.Add(proto)
            added.add(proto.name)
            del pending[proto.name]
    return pool


class Dynamic(NamedTuple):
    """A method called with message classes built at runtime from descriptors."""

    path: str
    request: type[Message]
    response: type[Message]


def dynamic(service: ServiceDescriptor, name: str) -> Dynamic:
    method: MethodDescriptor = service.methods_by_name[name]
    return Dynamic(
        path=f"/{service.full_name}/{method.name}",
        request=GetMessageClass(method.input_type),
        response=GetMessageClass(method.output_type),
    )


def call_unary(channel: grpc.Channel, method: Dynamic, **fields: Any) -> dict[str, Any]:
    rpc: grpc.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
        method.path,
        request_serializer=method.request.SerializeToString,
        response_deserializer=method.response.FromString,
    )
    response = rpc(method.request(**fields), timeout=RPC_TIMEOUT)
    assert type(response) is method.response
    return json_format.MessageToDict(response)


def first_streamed(channel: grpc.Channel, method: Dynamic, **fields: Any) -> dict[str, Any]:
    rpc: grpc.UnaryStreamMultiCallable[Message, Message] = channel.unary_stream(
        method.path,
        request_serializer=method.request.SerializeToString,
        response_deserializer=method.response.FromString,
    )
    call = rpc(method.request(**fields), timeout=RPC_TIMEOUT)
    try:
        response = next(call)
    finally:
        call.cancel()
    assert type(response) is method.response
    return json_format.MessageToDict(response)


# -- list_services and file_containing_symbol --------------------------------------------


@REFLECTION_PACKAGES
def test_list_services(channel: grpc.Channel, reflection_service: str) -> None:
    listed = list_services(reflect(channel, reflection_service))
    assert set(EXPECTED_SERVICES) <= set(listed)
    assert len(listed) == len(set(listed))


@REFLECTION_PACKAGES
@pytest.mark.parametrize("symbol", EXPECTED_SERVICES)
def test_file_containing_symbol(
    channel: grpc.Channel, reflection_service: str, symbol: str
) -> None:
    protos = files_for(reflect(channel, reflection_service), symbol)
    package, _, service = symbol.rpartition(".")
    defining = [
        proto
        for proto in protos
        if proto.package == package and service in {s.name for s in proto.service}
    ]
    assert len(defining) == 1, [proto.name for proto in protos]
    # The answer is self-contained: a fresh pool resolves the service from it alone.
    found = pool_from(protos).FindServiceByName(symbol)
    assert found.full_name == symbol
    assert found.methods


@REFLECTION_PACKAGES
def test_file_containing_message_symbols_and_file_by_filename(
    channel: grpc.Channel, reflection_service: str
) -> None:
    method = reflect(channel, reflection_service)
    protos = files_for(method, "grpc.health.v1.HealthCheckResponse")
    # grpcio-health-checking names its file grpc_health/v1/health.proto.
    assert [proto.name for proto in protos] == [health_pb2.DESCRIPTOR.name]
    (by_name,) = ask(method, Request(file_by_filename=health_pb2.DESCRIPTOR.name))
    assert list(by_name.file_descriptor_response.file_descriptor_proto) == [
        protos[0].SerializeToString()
    ]
    v1_protos = files_for(method, "grpc.reflection.v1.ServerReflectionRequest")
    assert [proto.name for proto in v1_protos] == ["grpc/reflection/v1/reflection.proto"]


@REFLECTION_PACKAGES
def test_unknown_symbol_is_a_not_found_error_response_on_a_live_stream(
    channel: grpc.Channel, reflection_service: str
) -> None:
    missing, listed = ask(
        reflect(channel, reflection_service),
        Request(file_containing_symbol="petsage.v1.DoesNotExist"),
        Request(list_services=""),
    )
    assert missing.WhichOneof("message_response") == "error_response"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert HEALTH in {service.name for service in listed.list_services_response.service}


def test_v1_descriptor_is_v1alpha_renamed(channel: grpc.Channel) -> None:
    (v1,) = files_for(reflect(channel, REFLECTION_V1), REFLECTION_V1)
    (v1alpha,) = files_for(reflect(channel, REFLECTION_V1ALPHA), REFLECTION_V1ALPHA)
    assert v1.package == "grpc.reflection.v1"
    assert v1alpha.package == "grpc.reflection.v1alpha"
    assert v1.name != v1alpha.name
    assert [m.name for m in v1.message_type] == [m.name for m in v1alpha.message_type]
    for new, old in zip(v1.message_type, v1alpha.message_type, strict=True):
        assert [(f.name, f.number, f.type, f.label) for f in new.field] == [
            (f.name, f.number, f.type, f.label) for f in old.field
        ]
        for field in new.field:
            assert "v1alpha" not in field.type_name
    (service,) = v1.service
    (rpc,) = service.method
    assert rpc.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert rpc.output_type == ".grpc.reflection.v1.ServerReflectionResponse"
    assert rpc.client_streaming
    assert rpc.server_streaming


# -- calling services with nothing but the reflected descriptors (as grpcurl does) --------


def _reflected_pool(
    channel: grpc.Channel, reflection_service: str
) -> descriptor_pool.DescriptorPool:
    method = reflect(channel, reflection_service)
    protos: list[FileDescriptorProto] = []
    for symbol in list_services(method):
        protos.extend(
            p for p in files_for(method, symbol) if p.name not in {q.name for q in protos}
        )
    return pool_from(protos)


@REFLECTION_PACKAGES
def test_call_health_and_smoke_test_with_dynamic_messages_only(
    server: InProcessServer, channel: grpc.Channel, reflection_service: str
) -> None:
    pool = _reflected_pool(channel, reflection_service)
    health = pool.FindServiceByName(HEALTH)
    smoke = pool.FindServiceByName(SMOKE_TEST_SERVICE)

    check = dynamic(health, "Check")
    # Really dynamic: classes of the fresh pool, not grpcio-health-checking's.
    assert check.request is not health_pb2.HealthCheckRequest
    assert check.request.DESCRIPTOR.file.pool is pool

    assert call_unary(channel, check) == {"status": "SERVING"}
    assert call_unary(channel, check, service=READINESS) == {"status": "SERVING"}
    server.board.set(READINESS, ServingStatus.NOT_SERVING)
    assert call_unary(channel, check, service=READINESS) == {"status": "NOT_SERVING"}
    with pytest.raises(grpc.RpcError) as failure:
        call_unary(channel, check, service="petsage.v1.Nope")
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND

    listed = call_unary(channel, dynamic(health, "List"))
    assert listed == {
        "statuses": {
            name: {"status": status.name} for name, status in server.board.snapshot().items()
        }
    }
    assert listed["statuses"][READINESS] == {"status": "NOT_SERVING"}

    watch = dynamic(health, "Watch")
    assert first_streamed(channel, watch, service=READINESS) == {"status": "NOT_SERVING"}
    assert first_streamed(channel, watch, service="petsage.v1.Later") == {
        "status": "SERVICE_UNKNOWN"
    }

    smoke_test = dynamic(smoke, "SmokeTest")
    assert call_unary(channel, smoke_test) == {
        "status": "ok",
        "message": "PetSage system is alive and purring.",
    }
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.NOT_SERVING)
    with pytest.raises(grpc.RpcError) as failure:
        call_unary(channel, smoke_test)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


@REFLECTION_PACKAGES
def test_reflection_itself_with_dynamic_messages(
    channel: grpc.Channel, reflection_service: str
) -> None:
    """A client that knows only v1 (or v1alpha) builds its messages from the reflected file."""
    pool = _reflected_pool(channel, reflection_service)
    info = dynamic(pool.FindServiceByName(reflection_service), "ServerReflectionInfo")
    assert info.request is not Request
    rpc: grpc.StreamStreamMultiCallable[Message, Message] = channel.stream_stream(
        info.path,
        request_serializer=info.request.SerializeToString,
        response_deserializer=info.response.FromString,
    )
    responses = list(rpc(iter([info.request(list_services="")]), timeout=RPC_TIMEOUT))
    (response,) = [json_format.MessageToDict(r) for r in responses]
    names = {service["name"] for service in response["listServicesResponse"]["service"]}
    assert set(EXPECTED_SERVICES) <= names


# -- grpcio-reflection's own client -----------------------------------------------------

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, timeout: float) -> None:
        self.method = details.method
        self.timeout = timeout
        self.metadata = details.metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class _DefaultDeadline(grpc.StreamStreamClientInterceptor):
    """Give every stream-stream call a deadline (ProtoReflectionDescriptorDatabase sets none)."""

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], grpc._CallIterator[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> grpc._CallIterator[_Resp]:
        if client_call_details.timeout is None:
            client_call_details = _CallDetails(client_call_details, RPC_TIMEOUT)
        return continuation(client_call_details, request_iterator)


@contextmanager
def bounded_channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield grpc.intercept_channel(channel, _DefaultDeadline())


def test_proto_reflection_descriptor_database_client(server: InProcessServer) -> None:
    with bounded_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(EXPECTED_SERVICES) <= set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)

        health = pool.FindServiceByName(HEALTH)
        assert set(health.methods_by_name) == {"Check", "Watch", "List"}
        check = dynamic(health, "Check")
        assert check.request is not health_pb2.HealthCheckRequest
        assert call_unary(channel, check, service=SMOKE_TEST_SERVICE) == {"status": "SERVING"}
        server.board.drain()
        assert call_unary(channel, check, service=SMOKE_TEST_SERVICE) == {"status": "NOT_SERVING"}
        assert first_streamed(channel, dynamic(health, "Watch")) == {"status": "NOT_SERVING"}

        smoke = pool.FindServiceByName(SMOKE_TEST_SERVICE)
        with pytest.raises(grpc.RpcError) as failure:
            call_unary(channel, dynamic(smoke, "SmokeTest"))
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
        server.board.resume()
        assert call_unary(channel, dynamic(smoke, "SmokeTest"))["status"] == "ok"

        v1 = pool.FindServiceByName(REFLECTION_V1)
        assert v1.methods_by_name["ServerReflectionInfo"].input_type.full_name == (
            "grpc.reflection.v1.ServerReflectionRequest"
        )
        assert pool.FindMessageTypeByName("grpc.health.v1.HealthListResponse").fields_by_name[
            "statuses"
        ]
        with pytest.raises(KeyError):
            pool.FindServiceByName("petsage.v1.DoesNotExist")


# -- add_to_server options --------------------------------------------------------------


@REFLECTION_PACKAGES
def test_reflected_services_are_listed(
    start_server: Callable[..., InProcessServer], reflection_service: str
) -> None:
    server = start_server(reflected_services=["my.pkg.Service", "my.pkg.Other"])
    with grpc.insecure_channel(server.address) as channel:
        listed = list_services(reflect(channel, reflection_service))
        assert {"my.pkg.Service", "my.pkg.Other", *EXPECTED_SERVICES} <= set(listed)
        assert len(listed) == len(set(listed))


@REFLECTION_PACKAGES
def test_no_reflection_when_disabled(
    start_server: Callable[..., InProcessServer], reflection_service: str
) -> None:
    server = start_server(reflection=False)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            list_services(reflect(channel, reflection_service))
        assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # The other services are still there.
        check: grpc.UnaryUnaryMultiCallable[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
