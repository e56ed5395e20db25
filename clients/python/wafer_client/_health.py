"""The standard ``grpc.health.v1.Health/Check`` call without depending on grpcio-health-checking.

That package belongs to the server extra; a client-only install should still be able to ask "is the
server up?". The health protocol is frozen, so its two messages are declared here, in a private
descriptor pool (the global pool may already hold grpc_health's copy, and two definitions of the same
file there would clash).
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

CHECK_METHOD: Final = "/grpc.health.v1.Health/Check"


def _build() -> tuple[type[Message], type[Message]]:
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="wafer_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


_REQUEST, _RESPONSE = _build()
_STATUS_ENUM = _RESPONSE.DESCRIPTOR.enum_types_by_name["ServingStatus"]


def serialize_request(service: str) -> bytes:
    # The classes are built at run time, so their fields are unknown to the type checker (the
    # protobuf stubs type Message() as taking no fields): fill the request by field name instead.
    return json_format.ParseDict({"service": service}, _REQUEST()).SerializeToString()


def deserialize_status(data: bytes) -> str:
    """The serving status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
    response: Any = _RESPONSE.FromString(data)
    value = _STATUS_ENUM.values_by_number.get(response.status)
    return value.name if value is not None else str(response.status)
