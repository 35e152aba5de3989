"""Redis client factory: one asyncio connection pool per process and service, to one Redis server (redis_url) or to
the primary that Redis Sentinel names (redis_sentinels); and guarded writes, which wait for replicas (WAIT)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, BusyLoadingError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelgrid.client.errors import Unavailable
from services.kit.redis_auth import redacted_url

if TYPE_CHECKING:
    from services.kit.settings import ServiceSettings

logger = logging.getLogger(__name__)

POOL_EXHAUSTED = "No connection available"
"""What BlockingConnectionPool raises (a ConnectionError) when no connection frees up within its timeout."""
SOCKET_TIMEOUT_S = 30.0
"""Longer than any blocking read the services make (XREAD BLOCK up to 5 s, WAIT up to its timeout)."""
SENTINEL_TIMEOUT_S = 2.0
"""How long a question to one sentinel may take before the next sentinel is asked."""


# -- guarded writes -----------------------------------------------------------------------------------------------


class ReplicaNotAcknowledged(Unavailable):
    """A guarded write was applied on the primary, but fewer replicas than required acknowledged it in time (or the
    connection was lost before they could say): UNAVAILABLE, retryable; the message says the write is applied."""


@dataclass(frozen=True)
class WriteGuard:
    """How a guarded write waits for replicas: `min_replicas` of them must acknowledge it (Redis' WAIT) within
    `timeout_ms`; 0 replicas means no WAIT at all. `service` names the owner in error messages."""

    min_replicas: int
    timeout_ms: int
    service: str = ""

    @property
    def active(self) -> bool:
        return self.min_replicas > 0

    def _owner(self) -> str:
        return f"the {self.service}'s" if self.service else "this service's"

    def check(self, acknowledged: int) -> None:
        """Raises ReplicaNotAcknowledged when WAIT answered fewer than min_replicas."""
        if acknowledged < self.min_replicas:
            replicas = "replica" if self.min_replicas == 1 else f"{self.min_replicas} replicas"
            raise ReplicaNotAcknowledged(
                f"{self._owner()} state store (Redis) wrote this change on its primary, but its {replicas} did not "
                f"acknowledge it within {self.timeout_ms} ms ({acknowledged} of {self.min_replicas} did): it may be "
                "lost if the primary fails now; read it back, then retry"
            )

    def lost(self) -> ReplicaNotAcknowledged:
        """The error for a connection lost while waiting for the replicas' acknowledgement."""
        return ReplicaNotAcknowledged(
            f"{self._owner()} state store (Redis) wrote this change on its primary, but the connection was lost "
            "before its replicas acknowledged it: it may be lost if the primary failed; read it back, then retry"
        )


def write_guard_for(settings: ServiceSettings, service: str = "") -> WriteGuard:
    """The guard of `settings`: redis_min_replicas, or when unset 1 with sentinels and 0 with a plain URL."""
    replicas = settings.redis_min_replicas
    if replicas is None:
        replicas = 1 if settings.redis_sentinels else 0
    return WriteGuard(replicas, settings.redis_replica_ack_timeout_ms, service)


class GuardedPipeline(Pipeline):
    """A pipeline (a transaction or not; WATCH works as usual) whose execute() sends `WAIT min_replicas timeout` on
    the connection that carried the write, right after it, before that connection goes back to the pool: WAIT
    counts the replicas that have the calling connection's last write. Raises ReplicaNotAcknowledged (after the write
    is applied on the primary) when too few answer in time. The write itself is never repeated by this."""

    def __init__(self, connection_pool: Any, response_callbacks: Any, transaction: bool, guard: WriteGuard) -> None:
        super().__init__(connection_pool, response_callbacks, transaction, None)
        self._guard = guard
        self._keep = False
        self._kept: Any = None
        self._kept_dirty = False

    async def reset(self) -> None:
        if self._keep and self.connection is not None:
            # execute() is ending: keep its connection for the WAIT instead of giving it back to the pool (a
            # connection kept before, if redis-py reset in the middle after an error, is closed and given back).
            await self._give_back(True)
            self._kept, self.connection = self.connection, None
            self._kept_dirty = self.watching
        await super().reset()

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self.command_stack and not self.watching:
            return []
        self._keep, self._kept, self._kept_dirty = True, None, False
        try:
            result = await super().execute(raise_on_error)
        except BaseException as exc:
            # Nothing to wait for. A WatchError or a command's error leaves the connection clean; anything else
            # (a lost connection, a cancellation) may leave a reply unread on it: close it before it goes back.
            await self._give_back(self._kept_dirty or not isinstance(exc, (WatchError, ResponseError)))
            raise
        finally:
            self._keep = False
        connection, clean = self._kept, False
        if connection is None:  # never expected: without the write's connection there is nothing to WAIT on
            raise self._guard.lost()
        try:
            await connection.send_command("WAIT", self._guard.min_replicas, self._guard.timeout_ms)
            acknowledged = int(await connection.read_response())
            clean = True
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._guard.lost() from exc
        finally:
            await self._give_back(not clean)
        self._guard.check(acknowledged)
        return result

    async def _give_back(self, disconnect: bool) -> None:
        connection, self._kept = self._kept, None
        if connection is None:
            return
        if disconnect:
            await asyncio.shield(connection.disconnect())
        await asyncio.shield(self.connection_pool.release(connection))


def guarded_pipeline(redis: aioredis.Redis, *, transaction: bool = True) -> Pipeline:
    """The pipeline for a write that must not be lost: a GuardedPipeline with the client's WriteGuard (see
    create_redis) when it asks for replicas, else an ordinary pipeline (no WAIT, no cost). Queue the writes (and
    Lua script calls) on it, WATCH/MULTI as usual, then execute() once; use it as `async with`."""
    guard = getattr(redis, "write_guard", None)
    if guard is None or not guard.active:
        return redis.pipeline(transaction=transaction)
    return GuardedPipeline(redis.connection_pool, redis.response_callbacks, transaction, guard)


# -- clients ------------------------------------------------------------------------------------------------------


class _SentinelConnection(SentinelManagedConnection):
    """Sentinel's connection, which also asks the sentinels for the primary when it reconnects by itself. redis-py
    asks them only when the pool hands out a closed connection (connect()); a command that retries on the same
    connection reconnects through connect_check_health() to the address it had, which after a fail-over is the old
    primary (down, or a replica that refuses every write with READONLY) for all of the command's retries."""

    _address_fresh = False

    async def connect_to(self, address: Any) -> None:
        self._address_fresh = True  # just asked: connect_check_health need not ask again
        try:
            await super().connect_to(address)
        finally:
            self._address_fresh = False

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and not self._address_fresh and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (each new connection asks the sentinels for the primary; READONLY from a demoted primary drops
    the connection and asks again) with the bounds of BlockingConnectionPool: at most max_connections, a call waits
    up to `timeout` for a free one."""


def parse_sentinels(addresses: Sequence[str]) -> list[tuple[str, int]]:
    """["host:port", "[::1]:26379"] -> [(host, port)]; ValueError for an address without a valid port."""
    parsed = []
    for address in addresses:
        host, sep, port = address.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {address!r} is not host:port")
        parsed.append((host, int(port)))
    return parsed


def _connection_options() -> dict[str, Any]:
    return {
        "decode_responses": True,
        "health_check_interval": 15,
        "socket_connect_timeout": 5,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


def create_redis(
    url: str,
    *,
    max_connections: int = 64,
    pool_timeout: float = 5.0,
    sentinels: Sequence[str] = (),
    sentinel_master: str = "modelgrid",
    sentinel_password: str | None = None,
    write_guard: WriteGuard | None = None,
) -> aioredis.Redis:
    """An asyncio Redis client that decodes replies to str and retries briefly when the server restarts. Its pool
    holds at most `max_connections`; a call that finds them all busy waits up to `pool_timeout` seconds for one.
    The password Redis requires comes in `url` (settings put the one of redis_password_file there); it is never
    logged.

    With `sentinels` (host:port), the client connects to the primary of `sentinel_master` that the sentinels name
    (asking them with `sentinel_password`, if they require one); `url` then gives only the password, user and
    database. After a fail-over, new connections go to the new primary: a connection that fails asks the sentinels
    again, and one still open to the old primary, now a replica, is dropped at its first write (READONLY).

    `write_guard` goes with the client (`.write_guard`) for guarded_pipeline()."""
    options = _connection_options()
    if sentinels:
        addresses = parse_sentinels(sentinels)
        given = parse_url(url)
        for key in ("username", "password", "db"):
            if given.get(key) not in (None, ""):
                options[key] = given[key]
        logger.info("state store: Redis primary %r named by the sentinels %s", sentinel_master, ", ".join(sentinels))
        sentinel = Sentinel(
            addresses,
            sentinel_kwargs={
                "password": sentinel_password,
                "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                "socket_timeout": SENTINEL_TIMEOUT_S,
                "decode_responses": True,
                "retry": Retry(NoBackoff(), 0),  # a sentinel that does not answer: ask the next one
            },
        )
        client = sentinel.master_for(
            sentinel_master,
            connection_pool_class=_BlockingSentinelPool,
            connection_class=_SentinelConnection,
            max_connections=max_connections,
            timeout=pool_timeout,
            **options,
        )
    else:
        logger.info("state store: Redis at %s", redacted_url(url))
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **options
        )
        client = aioredis.Redis(connection_pool=pool)
    client.write_guard = write_guard  # type: ignore[attr-defined]
    if write_guard is not None and write_guard.active:
        logger.info(
            "guarded writes wait for %d replica(s), up to %d ms", write_guard.min_replicas, write_guard.timeout_ms
        )
    return client


def create_redis_from(settings: ServiceSettings, service: str = "") -> aioredis.Redis:
    """create_redis with a service's settings: redis_url or redis_sentinels, pool bounds, and its WriteGuard."""
    return create_redis(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        pool_timeout=settings.redis_pool_timeout_seconds,
        sentinels=settings.redis_sentinels,
        sentinel_master=settings.redis_sentinel_master,
        sentinel_password=settings.redis_sentinel_password(),
        write_guard=write_guard_for(settings, service),
    )


# -- errors -------------------------------------------------------------------------------------------------------


DEMOTED_PRIMARY = "The previous master is now a slave"
"""What redis-py's Sentinel connection raises (a ConnectionError, after dropping the connection) for READONLY: the
server it was connected to is a replica now, and the next connection asks the sentinels for the new primary."""


def is_demoted_primary(exc: BaseException | None) -> bool:
    """True for a write refused (READONLY) by a primary that a fail-over made a replica: nothing was written (in a
    MULTI, Redis refuses the queued write and aborts the EXEC), so the write may be retried on the new primary."""
    return isinstance(exc, RedisConnectionError) and str(exc) == DEMOTED_PRIMARY


def is_outage(exc: BaseException) -> bool:
    """True for a Redis error that means the server is down, restarting or still loading its data (AOF replay), or
    that no primary is known during a fail-over: the call may succeed when retried. Wrong credentials are a
    configuration error, not an outage."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) and not isinstance(
        exc, (AuthenticationError, AuthorizationError)
    )


def outage_error(exc: BaseException, service: str = "") -> Unavailable:
    """The domain error for a Redis outage (see `is_outage`): retryable, with a message a user can act on and
    without the server's address or redis-py's internals."""
    owner = f"the {service}'s" if service else "this service's"
    if isinstance(exc, BusyLoadingError):
        state = "is loading its data after a restart"
    elif isinstance(exc, MasterNotFoundError):
        state = "has no primary right now (a fail-over may be under way)"
    elif POOL_EXHAUSTED in str(exc):
        return Unavailable(f"{owner} connections to its state store (Redis) are all busy; retry in a few seconds")
    elif isinstance(exc, RedisTimeoutError):
        state = "does not answer"
    else:
        state = "is unreachable"
    return Unavailable(f"{owner} state store (Redis) {state}; retry in a few seconds")
