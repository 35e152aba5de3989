"""Redis client factory: one asyncio connection pool per process and service."""

import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelgrid.client.errors import Unavailable
from services.kit.redis_auth import redacted_url

logger = logging.getLogger(__name__)

POOL_EXHAUSTED = "No connection available"
"""What BlockingConnectionPool raises (a ConnectionError) when no connection frees up within its timeout."""


def create_redis(url: str, *, max_connections: int = 64, pool_timeout: float = 5.0) -> aioredis.Redis:
    """An asyncio Redis client that decodes replies to str and retries briefly when the server restarts. Its pool
    holds at most `max_connections`; a call that finds them all busy waits up to `pool_timeout` seconds for one.
    The password Redis requires comes in `url` (settings put the one of redis_password_file there); it is never
    logged."""
    logger.info("state store: Redis at %s", redacted_url(url))
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        decode_responses=True,
        health_check_interval=15,
        socket_connect_timeout=5,
        # Longer than any blocking read the services make (XREAD BLOCK up to 5 s), or those would time out.
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis(connection_pool=pool)


def is_outage(exc: BaseException) -> bool:
    """True for a Redis error that means the server is down, restarting or still loading its data (AOF replay):
    the call may succeed when retried. Wrong credentials are a configuration error, not an outage."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) and not isinstance(
        exc, (AuthenticationError, AuthorizationError)
    )


def outage_error(exc: BaseException, service: str = "") -> Unavailable:
    """The domain error for a Redis outage (see `is_outage`): retryable, with a message a user can act on and
    without the server's address or redis-py's internals."""
    owner = f"the {service}'s" if service else "this service's"
    if isinstance(exc, BusyLoadingError):
        state = "is loading its data after a restart"
    elif POOL_EXHAUSTED in str(exc):
        return Unavailable(f"{owner} connections to its state store (Redis) are all busy; retry in a few seconds")
    elif isinstance(exc, RedisTimeoutError):
        state = "does not answer"
    else:
        state = "is unreachable"
    return Unavailable(f"{owner} state store (Redis) {state}; retry in a few seconds")
