"""The per-method policy table (wafer.rpc.policy): every service the server registers is in it, and
it says what the interceptors did by string prefixes before."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from wafer.rpc.policy import SERVICES, UNKNOWN, MethodPolicy, policy_for
from wafer_proto.v1 import index_pb2, inference_pb2, jobs_pb2, models_pb2


def registered_services() -> list[str]:
    return [
        *(
            f.full_name
            for m in (inference_pb2, models_pb2, index_pb2, jobs_pb2)
            for f in m.DESCRIPTOR.services_by_name.values()
        ),
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        "grpc.reflection.v1.ServerReflection",
    ]


def test_every_registered_service_has_a_policy() -> None:
    # A new service must be placed in the table on purpose (admin or not), not fall to a default.
    missing = [s for s in registered_services() if s not in SERVICES]
    assert not missing, f"add {missing} to wafer.rpc.policy.SERVICES"


OPEN_RPC = MethodPolicy()
ADMIN = MethodPolicy(admin=True)
PROBE = MethodPolicy(open=True, default_deadline=False, logged=False, drained=False)


@pytest.mark.parametrize(
    ("method", "policy"),
    [
        ("/wafer.v1.Inference/Embed", OPEN_RPC),
        ("/wafer.v1.Inference/Generate", OPEN_RPC),
        ("/wafer.v1.Index/Search", OPEN_RPC),
        ("/wafer.v1.Models/LoadModel", ADMIN),
        ("/wafer.v1.Jobs/SubmitJob", ADMIN),
        # Follows a job for as long as it runs: no default deadline.
        ("/wafer.v1.Jobs/WatchJob", MethodPolicy(admin=True, default_deadline=False)),
        ("/grpc.health.v1.Health/Check", PROBE),
        ("/grpc.health.v1.Health/Watch", PROBE),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", PROBE),
    ],
)
def test_the_table(method: str, policy: MethodPolicy) -> None:
    assert policy_for(method) == policy


def test_an_unknown_wafer_method_gets_the_strict_default() -> None:
    assert policy_for("/wafer.v2.Future/Call") == UNKNOWN
    assert UNKNOWN.drained and UNKNOWN.default_deadline and not UNKNOWN.open
    # Not Wafer's: not open either, but nothing of Wafer's to drain.
    other = policy_for("/grpc.health.v2.Health/Check")
    assert not other.open and not other.drained
