"""RegistryFollower in process: registry events reach ModelControl (an alias move becomes a swap, a new model is
auto-loaded), the cursor is kept in Redis, and a restarted registry is followed again with a resync."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from modelgrid.client.errors import Unavailable
from modelgrid.client.registry.types import KIND_TAG, RECIPE_KIND, ArtifactFormat
from modelgrid.registry.v1 import registry_pb2 as pb
from services.kit.redis_client import create_redis
from services.kit.streams import Backoff
from services.predictor.domain import VersionPolicy, VersionState
from services.predictor.follower import AUTO_POLICY, RegistryFollower
from services.registry.main import start_registry

pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST = Backoff(initial=0.05, maximum=0.2)


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def retried(call: Callable[[], Awaitable[object]], timeout: float = 15.0) -> None:
    """Retries a registry call that fails with Unavailable (a channel reconnecting after a restart)."""
    end = time.monotonic() + timeout
    while True:
        try:
            await call()
            return
        except Unavailable:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def redis(redis_server):
    client = create_redis(redis_server.url)
    yield client
    await client.aclose()


def routes_of(control, name: str) -> dict[str, int]:
    return control.status(name).routes if control.is_served(name) else {}


async def test_an_alias_moved_in_the_registry_swaps_the_served_version(control, registry_client, push, redis, unique):
    name = unique("followed")
    await push(name, 1)
    await push(name, 2)
    await registry_client.set_alias(name, "production", 1)
    await control.load(name, VersionPolicy(aliases=("production",)), wait=True)
    cursor_key = f"mg:unit:{uuid.uuid4().hex[:8]}:cursor"
    follower = RegistryFollower(registry_client, control, redis, cursor_key, backoff=FAST)
    await follower.start()
    try:
        await asyncio.wait_for(follower.ready.wait(), 10)
        await registry_client.set_alias(name, "production", 2)
        await eventually(lambda: routes_of(control, name) == {"production": 2}, "the alias swap")
        await eventually(
            lambda: [(v.version, v.state) for v in control.status(name).versions] == [(2, VersionState.AVAILABLE)],
            "version 1 unloaded",
        )
        cursor = await redis.get(cursor_key)
        assert cursor, "the processed cursor is kept in Redis"
    finally:
        await follower.stop()


async def register_recipe(registry_client, name: str, tmp_path) -> None:
    """A training recipe in the registry (a model tagged as one, a version holding Python source)."""
    await registry_client._stub().CreateModel(pb.CreateModelRequest(name=name, tags={KIND_TAG: RECIPE_KIND}))
    source = tmp_path / f"{name}.py"
    source.write_text("def build_model(input_shape, num_outputs):\n    raise NotImplementedError\n")
    blob = await registry_client.upload_blob(source)
    await registry_client.create_version_from_blob(
        name, blob.digest, request_id=uuid.uuid4().hex, artifact_format=ArtifactFormat.RAW
    )


async def test_auto_load_serves_registered_models_and_models_pushed_later(
    control, registry_client, push, redis, unique, tmp_path
):
    """...and never a training recipe, registered before the follower starts or after."""
    before, later = unique("before"), unique("later")
    recipe_before, recipe_later = unique("recipe"), unique("recipe")
    await push(before, 1)
    await register_recipe(registry_client, recipe_before, tmp_path)
    follower = RegistryFollower(
        registry_client, control, redis, f"mg:unit:{uuid.uuid4().hex[:8]}:cursor", auto_load=True, backoff=FAST
    )
    await follower.start()
    try:
        await eventually(lambda: control.is_served(before), "the registered model is served")
        assert control.status(before).policy == AUTO_POLICY
        await register_recipe(registry_client, recipe_later, tmp_path)
        await push(later, 1)
        await eventually(
            lambda: control.is_served(later) and bool(control.status(later).available), "the later model serves"
        )
        # The recipe's VERSION_CREATED came before the later model's, and the resync listed the first one.
        assert not control.is_served(recipe_before) and not control.is_served(recipe_later)
    finally:
        await follower.stop()


async def test_after_the_registry_restarts_the_follower_reconnects_and_resyncs(
    control, registry, registry_settings, registry_client, push, redis, unique
):
    name = unique("restart")
    await push(name, 1)
    await push(name, 2)
    await registry_client.set_alias(name, "production", 1)
    await control.load(name, VersionPolicy(aliases=("production",)), wait=True)
    follower = RegistryFollower(registry_client, control, redis, f"mg:unit:{uuid.uuid4().hex[:8]}:cursor", backoff=FAST)
    await follower.start()
    replacement = None
    try:
        await asyncio.wait_for(follower.ready.wait(), 10)
        await registry.stop()
        # Same port, same Redis keys and blobs: the registry came back. The alias moves while the stream is down
        # or reconnecting; the resync on reconnection (or the event itself) reaches the served model.
        replacement = await start_registry(registry_settings.model_copy(update={"port": registry.port}))
        await retried(lambda: registry_client.set_alias(name, "production", 2))
        await eventually(lambda: routes_of(control, name) == {"production": 2}, "the swap after the restart")
    finally:
        await follower.stop()
        if replacement is not None:
            await replacement.stop()
