"""Redis client factory: one asyncio connection pool per process and service."""

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def create_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """An asyncio Redis client that decodes replies to str and retries briefly when the server restarts."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        health_check_interval=15,
        socket_connect_timeout=5,
        # Longer than any blocking read the services make (XREAD BLOCK up to 5 s), or those would time out.
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
