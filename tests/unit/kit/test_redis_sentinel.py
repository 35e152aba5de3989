"""Redis through Sentinel and guarded writes (kit.redis_client): the settings, the WriteGuard's decisions and
messages, and with real Redis servers on loopback (no sentinel process here; tests/integration/test_redis_sentinel.py
runs real sentinels and a fail-over): WAIT runs on the connection of the write, a missing replica's silence fails the
write after it is applied, no WAIT at all with 0 replicas, and a connection still open to a primary that a fail-over
made a replica goes to the new primary at its first write instead of failing there forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError

from modelgrid.client.errors import Unavailable
from services.kit.interceptors import status_of
from services.kit.localinfra import RedisServer
from services.kit.redis_auth import write_password_file
from services.kit.redis_client import (
    DEMOTED_PRIMARY,
    GuardedPipeline,
    ReplicaNotAcknowledged,
    WriteGuard,
    create_redis,
    guarded_pipeline,
    is_demoted_primary,
    is_outage,
    outage_error,
    parse_sentinels,
    write_guard_for,
)
from services.kit.settings import ServiceSettings

# -- settings ---------------------------------------------------------------------------------------------------


def test_sentinel_addresses_come_comma_separated_or_as_json_and_must_be_host_port(monkeypatch) -> None:
    monkeypatch.setenv("MODELGRID_REDIS_SENTINELS", "198.18.0.1:26379, 198.18.0.2:26380")
    assert ServiceSettings().redis_sentinels == ["198.18.0.1:26379", "198.18.0.2:26380"]
    monkeypatch.setenv("MODELGRID_REDIS_SENTINELS", '["a:1", "[::1]:26379"]')
    assert ServiceSettings().redis_sentinels == ["a:1", "[::1]:26379"]
    assert parse_sentinels(["a:1", "[::1]:26379"]) == [("a", 1), ("::1", 26379)]
    monkeypatch.setenv("MODELGRID_REDIS_SENTINELS", "")
    assert ServiceSettings().redis_sentinels == []
    for bad in ("a", "a:", ":26379", "a:99999", "a:x"):
        monkeypatch.setenv("MODELGRID_REDIS_SENTINELS", bad)
        with pytest.raises(ValueError, match="host:port"):
            ServiceSettings()


def test_min_replicas_defaults_to_one_with_sentinels_and_zero_with_a_plain_url(monkeypatch) -> None:
    assert write_guard_for(ServiceSettings()) == WriteGuard(0, 1000)
    assert not write_guard_for(ServiceSettings()).active
    monkeypatch.setenv("MODELGRID_REDIS_SENTINELS", "127.0.0.1:26379")
    assert write_guard_for(ServiceSettings(), "registry") == WriteGuard(1, 1000, "registry")
    monkeypatch.setenv("MODELGRID_REDIS_MIN_REPLICAS", "0")
    monkeypatch.setenv("MODELGRID_REDIS_REPLICA_ACK_TIMEOUT_MS", "250")
    assert write_guard_for(ServiceSettings()) == WriteGuard(0, 250)
    monkeypatch.delenv("MODELGRID_REDIS_SENTINELS")
    monkeypatch.setenv("MODELGRID_REDIS_MIN_REPLICAS", "2")
    assert write_guard_for(ServiceSettings()).min_replicas == 2  # a plain URL may ask for replicas too


def test_the_sentinels_password_is_read_from_its_file_and_shown_nowhere(tmp_path: Path, monkeypatch) -> None:
    secret = "sentinel-secret-3f9a"
    write_password_file(tmp_path / "sentinel-password", secret)
    monkeypatch.setenv("MODELGRID_REDIS_SENTINEL_PASSWORD_FILE", str(tmp_path / "sentinel-password"))
    monkeypatch.setenv("MODELGRID_REDIS_SENTINELS", "127.0.0.1:26379")
    settings = ServiceSettings()
    assert settings.redis_sentinel_password() == secret
    assert secret not in repr(settings) and secret not in str(settings)
    assert secret not in settings.model_dump_json()
    client = create_redis(
        "redis://:redis-secret-77@127.0.0.1:6379/0", sentinels=settings.redis_sentinels, sentinel_password=secret
    )
    assert secret not in repr(client) and "redis-secret-77" not in repr(client)
    monkeypatch.setenv("MODELGRID_REDIS_SENTINEL_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(Exception, match="missing") as caught:
        ServiceSettings()
    assert secret not in str(caught.value)


# -- the guard's decisions and messages ---------------------------------------------------------------------------


def test_the_guard_passes_enough_acknowledgements_and_says_the_write_is_applied_otherwise() -> None:
    guard = WriteGuard(1, 750, "registry")
    guard.check(1)
    guard.check(2)
    with pytest.raises(ReplicaNotAcknowledged) as caught:
        guard.check(0)
    message = str(caught.value)
    assert message.startswith("the registry's state store (Redis) wrote this change on its primary")
    assert "750 ms" in message and "0 of 1" in message and "may be lost" in message and "retry" in message
    assert isinstance(caught.value, Unavailable) and status_of(caught.value).name == "UNAVAILABLE"
    with pytest.raises(ReplicaNotAcknowledged, match="its 2 replicas did not acknowledge it within 10 ms"):
        WriteGuard(2, 10).check(1)
    lost = WriteGuard(1, 10, "trainer").lost()
    assert "applied" not in str(lost) and "on its primary" in str(lost) and "connection was lost" in str(lost)


def test_no_wait_is_sent_without_replicas_to_wait_for() -> None:
    plain = create_redis("redis://127.0.0.1:1/0")
    assert type(guarded_pipeline(plain)) is Pipeline  # no guard
    plain.write_guard = WriteGuard(0, 1000)
    assert type(guarded_pipeline(plain)) is Pipeline
    plain.write_guard = WriteGuard(1, 1000)
    assert isinstance(guarded_pipeline(plain), GuardedPipeline)
    assert isinstance(guarded_pipeline(plain, transaction=False), GuardedPipeline)


def test_a_demoted_primary_and_a_missing_primary_are_outages_with_their_own_words() -> None:
    assert is_demoted_primary(RedisConnectionError(DEMOTED_PRIMARY))
    assert not is_demoted_primary(RedisConnectionError("Error 111 connecting"))
    assert not is_demoted_primary(None)
    missing = MasterNotFoundError("No master found for 'modelgrid' : <Redis 127.0.0.1:26379>")
    assert is_outage(missing)
    message = str(outage_error(missing, "registry"))
    assert (
        message == "the registry's state store (Redis) has no primary right now (a fail-over may be under way); "
        "retry in a few seconds"
    )


# -- with real servers --------------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica (same password), the replica in sync."""
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica", password=primary.password, replica_of=primary.port)
    with primary, replica:
        _wait_in_sync(replica)
        yield primary, replica


def _wait_in_sync(replica: RedisServer) -> None:
    with Redis(port=replica.port, password=replica.password, socket_timeout=5) as direct:
        deadline = time.monotonic() + 20
        while direct.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)


async def test_a_guarded_transaction_waits_on_its_own_connection_and_the_replica_has_it(pair) -> None:
    primary, replica = pair
    client = create_redis(primary.url, max_connections=4, write_guard=WriteGuard(1, 2000, "registry"))
    try:
        for round_ in range(20):  # a WAIT on another connection would count 0 (its offset is not the write's)
            async with guarded_pipeline(client) as pipe:
                await pipe.watch("k")
                current = int(await pipe.get("k") or 0)
                pipe.multi()
                pipe.set("k", current + 1)
                pipe.rpush("log", round_)
                assert await pipe.execute() == [True, round_ + 1]
            with Redis(port=replica.port, password=replica.password, decode_responses=True) as direct:
                assert direct.get("k") == str(round_ + 1)  # acknowledged: the replica has it
        async with guarded_pipeline(client, transaction=False) as pipe:
            pipe.set("plain", "1")
            assert await pipe.execute() == [True]
        # A Lua script (as the trainer's store writes) and its WAIT in one pipeline.
        bump = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        async with guarded_pipeline(client, transaction=False) as pipe:
            await bump(keys=["scripted"], args=[5], client=pipe)
            assert await pipe.execute() == [5]
        with Redis(port=replica.port, password=replica.password, decode_responses=True) as direct:
            assert direct.get("scripted") == "5"
        pool = client.connection_pool
        assert not pool._in_use_connections, "a guarded write kept its connection"
    finally:
        await client.aclose()


async def test_without_a_replica_a_guarded_write_fails_after_its_timeout_but_is_applied(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "alone") as alone:
        client = create_redis(alone.url, max_connections=4, write_guard=WriteGuard(1, 200, "registry"))
        try:
            started = time.monotonic()
            with pytest.raises(ReplicaNotAcknowledged, match="within 200 ms"):
                async with guarded_pipeline(client) as pipe:
                    await pipe.watch("k")
                    pipe.multi()
                    pipe.set("k", "written")
                    await pipe.execute()
            took = time.monotonic() - started
            assert 0.2 <= took < 2.0, took
            assert await client.get("k") == "written"  # applied on the primary, as the message says
            assert not client.connection_pool._in_use_connections
            # A WatchError (another client changed the key) is still a WatchError, and the connection goes back.
            async with guarded_pipeline(client) as pipe:
                await pipe.watch("k")
                await client.set("k", "changed")
                pipe.multi()
                pipe.set("k", "lost race")
                with pytest.raises(Exception, match="Watched variable changed"):
                    await pipe.execute()
            assert await client.get("k") == "changed"
            assert not client.connection_pool._in_use_connections
        finally:
            await client.aclose()


async def test_an_open_connection_to_a_demoted_primary_moves_to_the_new_primary_at_its_first_write(pair) -> None:
    """No sentinel process: the pool's sentinel manager is asked for the primary, and answers what this test says
    (as sentinels do after a fail-over). The roles are swapped by hand, without killing clients (a real fail-over
    also kills them; a partitioned old primary may not)."""
    primary, replica = pair
    names = {"modelgrid": ("127.0.0.1", primary.port)}

    client = create_redis(primary.url, sentinels=["127.0.0.1:1"], max_connections=2)

    async def discover_master(service_name: str) -> tuple[str, int]:
        return names[service_name]

    client.connection_pool.sentinel_manager.discover_master = discover_master
    try:
        await client.set("before", "1")
        connection = client.connection_pool._available_connections[0]
        assert connection.port == primary.port and connection.is_connected
        with (
            Redis(port=replica.port, password=replica.password) as new,
            Redis(port=primary.port, password=primary.password) as old,
        ):
            deadline = time.monotonic() + 10  # replication is asynchronous: on a loaded machine it takes a while
            while new.get("before") is None:
                assert time.monotonic() < deadline, "the replica never got the first write"
                await asyncio.sleep(0.02)
            new.replicaof("NO", "ONE")
            old.replicaof("127.0.0.1", replica.port)
        names["modelgrid"] = ("127.0.0.1", replica.port)
        # The pooled connection is still open to the old primary: the write is refused there (READONLY), and the
        # client moves it to the new primary instead of failing.
        await client.set("after", "2")
        with Redis(port=replica.port, password=replica.password, decode_responses=True) as new:
            assert new.get("after") == "2" and new.get("before") == "1"
        assert all(c.port == replica.port for c in client.connection_pool._available_connections if c.is_connected)
    finally:
        await client.aclose()


async def test_the_registrys_guarded_transaction_on_a_demoted_primary_runs_again_on_the_new_one(pair) -> None:
    """RegistryStore's WATCH/MULTI/EXEC meets READONLY at its first write (the connection it watched on is open to
    the old primary): nothing was written there, so the change runs again on the new primary, and waits for the
    new primary's replica (the old primary, now following it)."""
    from modelgrid.client.registry.types import RegisteredModel
    from services.registry.store import RegistryStore

    primary, replica = pair
    names = {"modelgrid": ("127.0.0.1", primary.port)}
    client = create_redis(
        primary.url, sentinels=["127.0.0.1:1"], max_connections=2, write_guard=WriteGuard(1, 5000, "registry")
    )

    async def discover_master(service_name: str) -> tuple[str, int]:
        return names[service_name]

    client.connection_pool.sentinel_manager.discover_master = discover_master
    store = RegistryStore(client, prefix="mg:test-demoted:")
    try:
        await store.create_model(RegisteredModel(name="before"), actor="pytest")
        with (
            Redis(port=replica.port, password=replica.password) as new,
            Redis(port=primary.port, password=primary.password) as old,
        ):
            new.replicaof("NO", "ONE")
            old.replicaof("127.0.0.1", replica.port)
        names["modelgrid"] = ("127.0.0.1", replica.port)
        _wait_in_sync(primary)  # the old primary follows the new one: the guarded write has its replica
        await store.create_model(RegisteredModel(name="after"), actor="pytest")
        with Redis(port=replica.port, password=replica.password, decode_responses=True) as new:
            assert new.zrange("mg:test-demoted:models", 0, -1) == ["after", "before"]
        assert (await store.get_model("after")).name == "after"
    finally:
        await client.aclose()
