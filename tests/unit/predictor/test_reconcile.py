"""ModelRepository.reconcile through ModelControl, in process: a real registry on port 0 (session Redis), real
SavedModels loaded by TensorFlow. Load, policy changes, the alias hot swap, unload, failed versions, and the
reasons a model reports when its policy cannot be met."""

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from modelgrid.client.errors import NotFound, Unavailable
from modelgrid.client.modelref import ModelRef
from modelgrid.client.registry import AsyncRegistryClient
from services.kit.channels import InstancePool
from services.kit.localinfra import free_port
from services.predictor.control import ModelControl
from services.predictor.domain import ModelState, VersionPolicy, VersionState
from services.predictor.inference import Inference
from services.predictor.metrics import PredictorMetrics

pytestmark = pytest.mark.asyncio(loop_scope="session")

X = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.7, 2.2]], dtype=np.float32)
SIGNATURE = "inputs (x: float32[-1,4]) -> outputs (y: float32[-1,3])"


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        await asyncio.sleep(0.02)


def loaded(control: ModelControl, name: str) -> list[tuple[int, VersionState]]:
    return [(v.version, v.state) for v in control.status(name).versions]


async def answering_version(control: ModelControl, ref: ModelRef) -> int:
    """The version that answers a real prediction for `ref`."""
    prediction = await Inference(control, PredictorMetrics(), max_request_rows=16).predict(ref, {"x": X})
    assert prediction.outputs["y"].shape == (2, 3)
    return prediction.version


async def test_load_waits_for_the_newest_version_and_serves_it(control, push, unique):
    name = unique("latest")
    await push(name, 1)
    await push(name, 2)

    status = await control.load(name, VersionPolicy(), wait=True)

    assert [(v.version, v.state) for v in status.versions] == [(2, VersionState.AVAILABLE)]
    assert status.state == ModelState.AVAILABLE and status.settled and not status.reason
    assert status.signature.describe() == SIGNATURE
    assert status.versions[0].available_since > 0
    assert await answering_version(control, ModelRef(name)) == 2
    assert control.is_ready(ModelRef(name, version=2)) and not control.is_ready(ModelRef(name, version=1))
    with pytest.raises(NotFound, match="loaded: \\[2\\]"):
        control.select(ModelRef(name, version=1))
    assert [m.name for m in control.index()] == [name]


async def test_a_loaded_version_waits_prepared_until_the_other_processes_have_it(
    registry_client, new_control, push, unique
):
    """In a replica of several processes a loaded version waits (PREPARED) at the barrier for the other processes:
    until the barrier returns the old version keeps every route, then the new version and its routes serve
    together."""
    gate, asked = asyncio.Event(), []

    async def barrier(model: str, versions: list[int]) -> None:
        asked.append((model, versions))
        await gate.wait()

    control = new_control(registry_client, barrier=barrier)
    try:
        name = unique("barrier")
        await push(name, 1)
        await push(name, 2)
        await registry_client.set_alias(name, "production", 1)
        production = ModelRef(name, alias="production")
        gate.set()
        await control.load(name, VersionPolicy(aliases=("production",), latest=0), wait=True)
        assert asked == [(name, [1])]
        gate.clear()

        await registry_client.set_alias(name, "production", 2)
        control.refresh(name)
        await eventually(lambda: loaded(control, name)[0] == (2, VersionState.PREPARED), "version 2 prepared")
        await asyncio.sleep(0.1)  # it stays there while the barrier holds
        assert loaded(control, name) == [(2, VersionState.PREPARED), (1, VersionState.AVAILABLE)]
        assert asked[-1] == (name, [2]) and control.status(name).routes == {"production": 1}
        assert await answering_version(control, production) == 1
        assert await answering_version(control, ModelRef(name)) == 1  # the newest AVAILABLE version
        with pytest.raises(NotFound, match="not loaded here"):
            control.select(ModelRef(name, version=2))

        gate.set()
        await eventually(lambda: control.status(name).routes == {"production": 2}, "the alias routes to 2")
        assert await answering_version(control, production) == 2
        await eventually(lambda: loaded(control, name) == [(2, VersionState.AVAILABLE)], "version 1 unloaded")
    finally:
        gate.set()
        await control.close()


async def test_a_new_policy_loads_what_it_wants_and_retires_the_rest(control, push, unique):
    name = unique("policy")
    await push(name, 1)
    await push(name, 2)
    status = await control.load(name, VersionPolicy(latest=2), wait=True)
    assert [(v.version, v.state) for v in status.versions] == [(2, VersionState.AVAILABLE), (1, VersionState.AVAILABLE)]
    assert await answering_version(control, ModelRef(name, version=1)) == 1

    await control.load(name, VersionPolicy(versions=(1,)), wait=True)

    await eventually(lambda: loaded(control, name) == [(1, VersionState.AVAILABLE)], "version 2 retired")
    assert await answering_version(control, ModelRef(name)) == 1
    assert control.status(name).policy == VersionPolicy(versions=(1,))


async def test_an_alias_move_swaps_after_the_new_version_loaded_and_the_old_one_drains_first(
    control, registry_client, push, unique
):
    name = unique("swap")
    await push(name, 1)
    await push(name, 2)
    await registry_client.set_alias(name, "production", 1)
    production = ModelRef(name, alias="production")
    status = await control.load(name, VersionPolicy(aliases=("production",)), wait=True)
    assert status.routes == {"production": 1} and loaded(control, name) == [(1, VersionState.AVAILABLE)]
    assert control.describe(production).aliases == ("production",)

    with control.select(production).use():  # a request still running on version 1
        await registry_client.set_alias(name, "production", 2)
        control.refresh(name)
        await eventually(lambda: control.status(name).routes == {"production": 2}, "the alias routes to 2")
        assert await answering_version(control, production) == 2
        assert loaded(control, name) == [(2, VersionState.AVAILABLE), (1, VersionState.UNLOADING)]
        assert control.versions_of(production)[0].version == 2

    await eventually(lambda: loaded(control, name) == [(2, VersionState.AVAILABLE)], "version 1 unloaded")
    assert control.describe(production).version == 2


async def test_unload_stops_serving_and_a_second_unload_is_not_found(control, push, unique):
    name = unique("unload")
    await push(name, 1)
    await control.load(name, VersionPolicy(), wait=True)
    assert control.is_served(name)

    await control.unload(name)

    assert not control.is_served(name) and control.index() == []
    with pytest.raises(NotFound):
        control.select(ModelRef(name))
    with pytest.raises(NotFound):
        control.status(name)
    with pytest.raises(NotFound):
        await control.unload(name)


async def test_a_version_that_fails_to_load_says_why_and_the_others_keep_serving(control, push, unique):
    name = unique("half-broken")
    await push(name, 1)
    await push(name, 0)  # version 2: not a loadable SavedModel

    status = await control.load(name, VersionPolicy(latest=2), wait=True)

    (broken,) = control.versions_of(ModelRef(name, version=2))
    assert broken.state == VersionState.FAILED and broken.reason
    assert [(v.version, v.state) for v in status.versions] == [(2, VersionState.FAILED), (1, VersionState.AVAILABLE)]
    assert status.state == ModelState.AVAILABLE
    assert await answering_version(control, ModelRef(name)) == 1
    assert "version 2: " in status.failure()

    only_broken = unique("broken")
    await push(only_broken, 0)
    status = await control.load(only_broken, VersionPolicy(), wait=True, keep_if_empty=False)
    assert status.state == ModelState.UNAVAILABLE and status.failure().startswith("version 1: ")
    assert control.is_served(only_broken)  # it has a version to show, even a failed one
    with pytest.raises(Unavailable):
        control.select(ModelRef(only_broken))


async def test_a_policy_the_registry_cannot_meet_says_why(control, push, unique):
    name = unique("no-alias")
    await push(name, 1)
    status = await control.load(name, VersionPolicy(aliases=("production",)), wait=True)
    assert status.versions == () and status.state == ModelState.UNAVAILABLE
    assert "production" in status.reason and status.failure() == status.reason
    with pytest.raises(NotFound, match="alias 'production'"):
        control.select(ModelRef(name, alias="production"))
    with pytest.raises(Unavailable, match="production"):
        control.select(ModelRef(name))

    missing = unique("never-registered")
    status = await control.load(missing, VersionPolicy(), wait=True)
    assert "not found" in status.reason and control.is_served(missing)  # LoadModel keeps it, with its reason
    await control.unload(missing)
    status = await control.load(missing, VersionPolicy(), wait=True, keep_if_empty=False)
    assert "not found" in status.reason and not control.is_served(missing)  # OIP's load does not


async def test_an_unreachable_registry_is_the_models_reason(new_control, unique):
    pool = InstancePool(None, "registry", targets=[f"127.0.0.1:{free_port()}"])  # nothing listens there
    await pool.start()
    control = new_control(AsyncRegistryClient(pool))
    try:
        name = unique("offline")
        status = await control.load(name, VersionPolicy(), wait=True)
        assert status.reason.startswith("cannot reconcile with the registry") and status.state == ModelState.UNAVAILABLE
        with pytest.raises(Unavailable, match="cannot reconcile"):
            control.select(ModelRef(name))
    finally:
        await control.close()
        await pool.close()
