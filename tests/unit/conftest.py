"""Fixtures of the in-process tier: a real registry started in this process on port 0 (registered in the session's
real Consul, state in the session's real Redis), and its typed client over a real channel."""

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.clients.registry import AsyncRegistryClient
from services.kit.channels import InstancePool
from services.kit.server import GrpcService
from services.registry.main import start_registry
from services.registry.settings import RegistrySettings


@pytest.fixture
def registry_settings(consul, redis_server, tmp_path) -> RegistrySettings:
    """A registry on localhost, port 0, with its own Redis keys, blob directory and Consul service name (so that
    tests never see each other's instances)."""
    return RegistrySettings(
        port=0,
        redis_url=redis_server.url,
        consul_url=consul.http_url,
        consul_check_interval="1s",
        blob_dir=tmp_path / "blobs",
        redis_key_prefix=f"mg:unit:{uuid.uuid4().hex[:8]}:",
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
    pool = InstancePool(None, "registry", targets=[f"127.0.0.1:{registry.port}"])
    await pool.start()
    yield AsyncRegistryClient(pool, client_id="pytest")
    await pool.close()
