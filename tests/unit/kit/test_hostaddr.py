"""This host's address, found at start: from the local Consul agent, from the route to a remote one, or loopback."""

import pytest

from services.kit.hostaddr import AUTO, _route_source, host_address, resolve_addresses
from services.kit.localinfra import free_port
from services.kit.settings import ServiceSettings

on_session_loop = pytest.mark.asyncio(loop_scope="session")  # not a module mark: one test here is not async


@on_session_loop
async def test_a_local_agent_tells_the_address_it_uses_in_the_cluster(consul):
    # The session's dev agent is bound to 127.0.0.1, so that is this host's address in its one-host cluster.
    assert await host_address(consul.http_url) == "127.0.0.1"


@on_session_loop
async def test_without_consul_the_host_is_loopback():
    assert await host_address("http://127.0.0.1:1", consul_enabled=False) == "127.0.0.1"


@on_session_loop
async def test_an_agent_that_does_not_answer_gives_loopback_and_does_not_hang():
    assert await host_address(f"http://127.0.0.1:{free_port()}", timeout=1.0) == "127.0.0.1"


def test_the_route_source_toward_a_remote_agent_is_an_own_address():
    assert _route_source("127.0.0.1", 8500) == "127.0.0.1"


@on_session_loop
async def test_auto_binds_the_advertised_address_and_explicit_values_stay(consul):
    settings = ServiceSettings(consul_url=consul.http_url)
    assert (settings.host, settings.advertise_host) == (AUTO, AUTO)
    await resolve_addresses(settings)
    assert (settings.host, settings.advertise_host) == ("127.0.0.1", "127.0.0.1")
    explicit = ServiceSettings(consul_url=consul.http_url, host="0.0.0.0", advertise_host="registry")
    await resolve_addresses(explicit)
    assert (explicit.host, explicit.advertise_host) == ("0.0.0.0", "registry")
