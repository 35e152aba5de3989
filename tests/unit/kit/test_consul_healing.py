"""Registration and discovery across a kill -9 and restart of the Consul agent (a real dev agent of this module's
own, restarted on the same HTTP port; a dev agent keeps nothing, as after the restart an operator meets)."""

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider

from services.kit.consul import ConsulClient, Instance, Registration
from services.kit.discovery import ServiceResolver
from services.kit.localinfra import ConsulAgent
from services.kit.server import GrpcService, ServiceSpec
from services.kit.settings import ServiceSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> ConsulAgent:
    with ConsulAgent(tmp_path_factory.mktemp("consul-healing")) as running:
        yield running


async def restart(agent: ConsulAgent, down_for: float = 0.5) -> float:
    """kill -9 of the agent, `down_for` seconds of outage, a fresh start on the same port; returns when it answers
    (time.monotonic())."""
    agent.kill()
    await asyncio.sleep(down_for)
    await asyncio.to_thread(agent.start)
    return time.monotonic()


@pytest_asyncio.fixture(loop_scope="session")
async def consul(agent) -> AsyncIterator[ConsulClient]:
    client = ConsulClient(agent.http_url, timeout=2.0)
    yield client
    await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def start_service(agent, unique):
    """start_service(name, tags, resync) -> a serving GrpcService registered in the module's agent, stopped after
    the test."""
    started: list[GrpcService] = []

    async def start(name: str, tags: Sequence[str] = (), resync: float = 0.3) -> GrpcService:
        settings = ServiceSettings(
            port=0, consul_url=agent.http_url, consul_resync_interval=resync, shutdown_grace_seconds=0.1
        )
        service = GrpcService(
            ServiceSpec(name, "0", [], lambda server: None, tags=list(tags)), settings, TracerProvider()
        )
        await service.start()
        started.append(service)
        await service.set_serving(True)
        return service

    yield start
    for service in started:
        await service.stop()


async def passing(consul: ConsulClient, name: str) -> list[Instance]:
    _, instances = await consul.healthy_instances(name)
    return instances


async def wait_until(condition, timeout: float) -> float:
    """Polls the async `condition()` until it is true; returns how long that took. Fails after `timeout`."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, f"not true within {timeout}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_a_service_registers_again_with_its_latest_tags_after_the_agent_restarts(
    agent, consul, start_service, unique
):
    name = unique("heal")
    service = await start_service(name, tags=["v1"])
    await wait_until(lambda: _has(consul, name, {"v1"}), timeout=10)

    agent.kill()
    await service.update_registration(tags=["v2"])  # made while the agent is down: kept, not raised
    back = await restart(agent, down_for=0.0)
    await wait_until(lambda: _has(consul, name, {"v2"}), timeout=10)
    took = time.monotonic() - back
    print(f"registered again and passing {took:.2f}s after the agent answered")
    assert took < 10


async def test_discovery_holds_the_last_healthy_set_through_a_restart(agent, consul, start_service, unique):
    name = unique("hold")
    for _ in range(2):
        await start_service(name, resync=2.0)  # the watcher sees the empty catalog before they register again
    resolver = ServiceResolver(consul, name, wait="2s", hold_seconds=30)
    seen: list[int] = []
    resolver.add_listener(lambda instances: seen.append(len(instances)))
    await resolver.start()
    try:
        await resolver.wait_for(lambda instances: len(instances) == 2, timeout=10)
        seen.clear()
        await restart(agent)
        await wait_until(lambda: _count(consul, name, 2), timeout=15)
        await wait_until(lambda: _not_holding(resolver), timeout=10)
        assert len(resolver.instances) == 2
        assert all(count == 2 for count in seen), f"the set shrank during the restart: {seen}"
    finally:
        await resolver.stop()


async def test_the_hold_is_bounded_for_an_instance_that_never_comes_back(agent, consul, start_service, unique):
    name = unique("gone")
    service = await start_service(name)
    # A second registration of the same server that nobody keeps: after the restart it is never registered again.
    orphan = Registration(id=f"{name}-orphan", name=name, address="127.0.0.1", port=service.port, check_interval="1s")
    await consul.register(orphan, passing=True)
    resolver = ServiceResolver(consul, name, wait="2s", hold_seconds=3)
    await resolver.start()
    try:
        await resolver.wait_for(lambda instances: len(instances) == 2, timeout=10)
        await restart(agent)
        await wait_until(lambda: _count(consul, name, 1), timeout=10)
        assert {i.id for i in resolver.instances} == {service.instance_id, orphan.id}, "held while it may come back"
        await resolver.wait_for(lambda instances: [i.id for i in instances] == [service.instance_id], timeout=10)
        assert not resolver.holding
    finally:
        await resolver.stop()


async def test_an_instance_whose_check_fails_leaves_even_while_others_are_held(agent, consul, start_service, unique):
    name = unique("sick")
    healthy, sick = await start_service(name), await start_service(name)
    resolver = ServiceResolver(consul, name, wait="2s", hold_seconds=30)
    await resolver.start()
    try:
        await resolver.wait_for(lambda instances: len(instances) == 2, timeout=10)
        agent.kill()
        await sick.set_serving(False)  # it re-registers critical: its health, not the blink, decides
        await restart(agent, down_for=0.0)
        await resolver.wait_for(lambda instances: [i.id for i in instances] == [healthy.instance_id], timeout=10)
    finally:
        await resolver.stop()


async def test_a_deregistered_instance_leaves_at_once_outside_a_blink(consul, start_service, unique):
    name = unique("leave")
    staying, leaving = await start_service(name), await start_service(name)
    resolver = ServiceResolver(consul, name, wait="2s", hold_seconds=30)
    await resolver.start()
    try:
        await resolver.wait_for(lambda instances: len(instances) == 2, timeout=10)
        await leaving.stop()
        await resolver.wait_for(lambda instances: [i.id for i in instances] == [staying.instance_id], timeout=5)
        assert not resolver.holding
    finally:
        await resolver.stop()


async def _has(consul: ConsulClient, name: str, tags: set[str]) -> bool:
    try:
        return any(set(i.tags) == tags for i in await passing(consul, name))
    except httpx.HTTPError:  # the agent is still starting
        return False


async def _count(consul: ConsulClient, name: str, count: int) -> bool:
    try:
        return len(await passing(consul, name)) == count
    except httpx.HTTPError:  # the agent is still starting
        return False


async def _not_holding(resolver: ServiceResolver) -> bool:
    return not resolver.holding
