"""Fixtures of the in-process tier: a real registry started in this process on port 0 (state in the session's real
Redis), and its typed client over a real channel."""

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from modelgrid.client.registry import AsyncRegistryClient
from services.kit.channels import InstancePool
from services.kit.server import GrpcService
from services.registry.main import start_registry
from services.registry.settings import RegistrySettings

FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
"""A channel whose server went away tries again within half a second (gRPC's default backoff grows to minutes)."""


@pytest.fixture
def registry_settings(redis_server, tmp_path) -> RegistrySettings:
    """A registry on localhost, port 0, with its own Redis keys and blob directory. It stays out of Consul (tests
    reach it by address), so that no service another test started can discover it."""
    return RegistrySettings(
        port=0,
        redis_url=redis_server.url,
        blob_dir=tmp_path / "blobs",
        redis_key_prefix=f"mg:unit:{uuid.uuid4().hex[:8]}:",
        consul_enabled=False,
        shutdown_grace_seconds=0.2,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def registry(registry_settings) -> AsyncIterator[GrpcService]:
    """A registry running in this process (its port is `.port`), stopped after the test."""
    service = await start_registry(registry_settings)
    yield service
    await service.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def registry_client(registry) -> AsyncIterator[AsyncRegistryClient]:
    """The typed client services use, over a pool holding the in-process registry's address."""
    pool = InstancePool(None, "registry", targets=[f"127.0.0.1:{registry.port}"], options=FAST_RECONNECT)
    await pool.start()
    yield AsyncRegistryClient(pool, client_id="pytest")
    await pool.close()
