"""What each RPC gets from the interceptors, in one table: whether it needs the admin token, whether
the default deadline applies, whether its calls are logged, and whether a drain refuses and counts it.

Policies are per service, with exceptions per method. A method of a service the table does not name
gets the strict policy (`UNKNOWN`): it needs the token under `auth_all_rpcs`, has the default
deadline and is logged; it is drained when it is one of Wafer's (`/wafer.` services).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    # Needs the bearer token whenever the server has one: the calls that change the server.
    admin: bool = False
    # Never needs the token, even with auth_all_rpcs: probes carry no secret, and reflection only
    # describes the API.
    open: bool = False
    # The server's default deadline applies when the client set none. Not to streams that follow
    # something long-lived (a health Watch lives as long as its client, WatchJob as its job).
    default_deadline: bool = True
    # One log line per call. Health checks and reflection are polled; logging each would drown the log.
    logged: bool = True
    # Refused with UNAVAILABLE once the server drains, and counted in flight until it ends. Not
    # health (it must keep answering NOT_SERVING during the drain) nor reflection.
    drained: bool = True


_PROBE: Final = MethodPolicy(open=True, default_deadline=False, logged=False, drained=False)
_ADMIN: Final = MethodPolicy(admin=True)
_OPEN_RPC: Final = MethodPolicy()

SERVICES: Final[dict[str, MethodPolicy]] = {
    "grpc.health.v1.Health": _PROBE,
    "grpc.reflection.v1.ServerReflection": _PROBE,
    "grpc.reflection.v1alpha.ServerReflection": _PROBE,
    "wafer.v1.Inference": _OPEN_RPC,
    "wafer.v1.Index": _OPEN_RPC,
    # Loading and unloading models, and jobs: they change the server.
    "wafer.v1.Models": _ADMIN,
    "wafer.v1.Jobs": _ADMIN,
}
METHODS: Final[dict[str, MethodPolicy]] = {
    "/wafer.v1.Jobs/WatchJob": MethodPolicy(admin=True, default_deadline=False),
}
UNKNOWN: Final = MethodPolicy()
# Not Wafer's, not named: nothing to drain (the server registers no such service today).
_FOREIGN: Final = MethodPolicy(drained=False)


def service_of(method: str) -> str:
    """`/wafer.v1.Models/LoadModel` → `wafer.v1.Models`."""
    return method.lstrip("/").split("/", 1)[0]


def policy_for(method: str) -> MethodPolicy:
    """The policy of a call to `method` (gRPC's full method path)."""
    found = METHODS.get(method) or SERVICES.get(service_of(method))
    if found is not None:
        return found
    return UNKNOWN if service_of(method).startswith("wafer.") else _FOREIGN
