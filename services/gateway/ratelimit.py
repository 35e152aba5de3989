"""Per-key rate limits: a token bucket per API key in Redis, shared by every gateway instance, drawn in small leases.

The bucket holds up to rate x burst_seconds tokens and refills at `rate` per second; a call spends one. Asking
Redis on every call costs about as much gateway CPU as the rest of the call, so an instance takes up to a lease of
tokens at once (one script run, never more than the bucket holds) and spends them on the key's next calls without
asking again. One refill per key is in flight at a time in an instance; calls that find the lease empty meanwhile
wait for it.

What stays exact: tokens only ever come out of the shared bucket, so the sustained rate of a key, all instances
together, is the rate; a key with a low rate (rate x lease_seconds below 2) leases one token at a time, which is
asking Redis on every call, as without leases. What a lease changes: tokens an instance holds have left the bucket,
which then refills while they are unspent, so a key's largest burst grows from rate x burst_seconds by at most
what the instances hold: lease_tokens (and rate x lease_seconds) per instance. Held tokens do not expire: they go
to the key's next calls on that instance, so a caller spread over many instances is not refused below its rate
(tokens stay unspent only where the key's calls stopped coming: at most a lease per instance).

A refusal says how long until the bucket has a token again; nothing can put one back sooner (leased tokens are
not returned), so the instance refuses the key's calls until then without asking Redis.
"""

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from modelgrid.client.errors import ResourceExhausted

# KEYS[1] bucket hash; ARGV rate/s, capacity, now (s), most tokens wanted. Takes what it can up to that (whole
# tokens) and returns {taken, 0}, or {0, ms until one token is there} when the bucket holds less than one.
_TOKEN_BUCKET = """
local rate, capacity, now, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local taken = math.min(want, math.floor(tokens))
local wait_ms = 0
if taken >= 1 then
  tokens = tokens - taken
else
  taken = 0
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {taken, wait_ms}
"""


@dataclass(slots=True)
class _Lease:
    """The tokens of one key this instance holds, and until when (monotonic clock) the key's bucket is empty."""

    tokens: int = 0
    empty_until: float = 0.0
    refill: asyncio.Lock = field(default_factory=asyncio.Lock)


class RateLimiter:
    """Token buckets per key in Redis (under `prefix`), spent through leases of up to `lease_tokens` tokens."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        burst_seconds: float,
        lease_tokens: int = 1,
        lease_seconds: float = 0.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bucket = redis.register_script(_TOKEN_BUCKET)
        self._prefix = prefix
        self._burst = burst_seconds
        self._lease_tokens = lease_tokens
        self._lease_seconds = lease_seconds
        self._max_keys = max_keys
        self._clock = clock
        self._leases: dict[str, _Lease] = {}

    def lease_size(self, rate: float) -> int:
        """Most tokens one refill takes for a key of this rate: lease_tokens, at most rate x lease_seconds, at least
        one."""
        return max(1, min(self._lease_tokens, int(rate * self._lease_seconds)))

    def held(self, key_id: str) -> int:
        """Tokens of this key the instance holds now."""
        lease = self._leases.get(key_id)
        return lease.tokens if lease is not None else 0

    async def take(self, key_id: str, name: str, rate: float) -> None:
        """Spends one token of the key (`name` is how the caller is told which key), or ResourceExhausted with the
        wait. RedisError when Redis cannot be asked."""
        lease = self._leases.get(key_id)
        if lease is None:
            lease = self._lease_of(key_id)
        elif lease.tokens:
            lease.tokens -= 1
            return
        self._refuse_while_empty(lease, name, rate)
        async with lease.refill:
            if lease.tokens:  # refilled while this call waited
                lease.tokens -= 1
                return
            self._refuse_while_empty(lease, name, rate)
            capacity = max(rate * self._burst, 1.0)
            args = [rate, capacity, time.time(), self.lease_size(rate)]
            taken, wait_ms = await self._bucket(keys=[f"{self._prefix}bucket:{key_id}"], args=args)
            if taken:
                lease.tokens = int(taken) - 1
                return
            lease.empty_until = self._clock() + int(wait_ms) / 1000
            raise _refused(rate, name, int(wait_ms))

    def _refuse_while_empty(self, lease: _Lease, name: str, rate: float) -> None:
        wait = lease.empty_until - self._clock()
        if wait > 0:
            raise _refused(rate, name, math.ceil(wait * 1000))

    def _lease_of(self, key_id: str) -> _Lease:
        """A new lease (bounded: the oldest goes when `max_keys` are kept; its few tokens are then not spent)."""
        leases = self._leases
        while len(leases) >= self._max_keys:
            del leases[next(iter(leases))]
        lease = leases[key_id] = _Lease()
        return lease


def _refused(rate: float, name: str, wait_ms: int) -> ResourceExhausted:
    return ResourceExhausted(f"rate limit of {rate:g} requests/s for key {name!r} reached; retry in {wait_ms} ms")
