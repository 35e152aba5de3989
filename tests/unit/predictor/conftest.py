"""In-process fixtures of the predictor's unit tests (the registry and its client come from tests/unit/conftest.py):
small real SavedModels, and a ModelControl that loads them with TensorFlow."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from modelgrid.client.registry import AsyncRegistryClient, ModelVersion
from services.predictor.batching import BatchingConfig
from services.predictor.cache import ArtifactCache
from services.predictor.control import ModelControl
from services.predictor.runtime import SavedModelRunner


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, build_saved_model) -> dict[int, Path]:
    """Two small SavedModels that answer differently (seeds 1 and 2), and a directory that is no SavedModel but
    passes the registry's check (an empty saved_model.pb): TensorFlow fails to load it."""
    root = tmp_path_factory.mktemp("saved-models")
    models = {seed: build_saved_model(root / f"seed-{seed}", seed=seed) for seed in (1, 2)}
    broken = root / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"")
    models[0] = broken
    return models


@pytest.fixture
def push(registry_client, saved_models) -> Callable[[str, int], Awaitable[ModelVersion]]:
    """`await push(name, seed)`: registers `name` if needed and pushes saved_models[seed] as its next version."""

    async def push(name: str, seed: int) -> ModelVersion:
        await registry_client.ensure_model(name)
        return await registry_client.push_savedmodel(name, saved_models[seed], request_id=uuid.uuid4().hex)

    return push


@pytest.fixture
def new_control(tmp_path) -> Callable[..., ModelControl]:
    """`new_control(client, **options)`: a ModelControl over a registry client, with TensorFlow loading and one
    warm-up request per version (the caller closes it)."""

    def new_control(client: AsyncRegistryClient, **options) -> ModelControl:
        return ModelControl(
            client,
            ArtifactCache(tmp_path / f"cache-{uuid.uuid4().hex[:6]}", 1 << 30),
            SavedModelRunner,
            BatchingConfig(max_batch_size=8, max_queue_delay_ms=0),
            warmup_requests=1,
            **options,
        )

    return new_control


@pytest_asyncio.fixture(loop_scope="session")
async def control(registry_client, new_control) -> AsyncIterator[ModelControl]:
    """A ModelControl over the in-process registry, closed (every model unloaded) after the test."""
    control = new_control(registry_client)
    yield control
    await control.close()
