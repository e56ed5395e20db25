"""The model registry: every model of the catalog, its state, and who is using it.

- `lifecycle.ModelRegistry`: states, loads, leases, swaps and unloads.
- `memory.MemoryPolicy`: the memory budget, eviction, keep-alive and heap trimming.
- `entries`: what is kept per model, and what a lease hands out.

States: UNLOADED → LOADING → READY → UNLOADING → UNLOADED, and FAILED when a load fails.
- A request *leases* a model for its duration. Leasing an unloaded model loads it (on demand);
  leasing a loading model waits for it.
- Unloading refuses new leases (UNAVAILABLE), waits for the held ones to end, then frees the model.
  Freeing a llama.cpp model under a running call would crash the process; this never does.
- A swap (a load with a new spec) loads the new instance beside the old one, moves new leases to it
  in one step, and frees the old one once the leases it holds end: a lease keeps the instance it was
  given, so no request sees a model change under it. A new spec that fails to load changes nothing.
- Under a memory budget a load first unloads idle, unpinned models, least recently used first, or is
  refused (RESOURCE_EXHAUSTED) naming what holds the memory. Automatic unloads (eviction, keep-alive)
  only take idle models, and a request arriving meanwhile waits and loads the model again rather
  than failing; only an admin's unload answers UNAVAILABLE.
- An on-demand load may unload other models to make room only for a caller allowed to
  (`allow_on_demand_eviction`): with an admin token set, the RPC layer allows it only to calls that
  carry the token. Otherwise a load that fits the budget as it is goes ahead, and one that would
  unload another model is refused (PERMISSION_DENIED): unloading is an admin act. LoadModel may always.
- Loads run one at a time, so the memory a load adds is estimated as the change in RSS across the
  load and its warm-up call (which is where ONNX Runtime sizes its arena). Only an estimate: other
  models keep computing meanwhile.
"""

from wafer.registry.entries import NEVER_LOADED, LoadedModel, ModelState, ModelStatus
from wafer.registry.lifecycle import MAX_DEFAULT_INSTANCES, ModelRegistry, default_instances, instance_plan
from wafer.registry.memory import allow_on_demand_eviction, limit_heap_arenas, trim_heap

__all__ = [
    "MAX_DEFAULT_INSTANCES",
    "NEVER_LOADED",
    "LoadedModel",
    "ModelRegistry",
    "ModelState",
    "ModelStatus",
    "allow_on_demand_eviction",
    "default_instances",
    "instance_plan",
    "limit_heap_arenas",
    "trim_heap",
]
