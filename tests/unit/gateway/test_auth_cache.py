"""API keys kept checked in the process for a bounded time, and rate-limit tokens leased from the shared bucket, over
the session's real Redis with an injected clock: a cached key needs no Redis read, a key revoked through another
instance is refused once the bound has passed (through this one at once), a wrong secret or a refusal is never
kept; a lease never takes more than the bucket holds, one refill is in flight per key, and a refusal holds until
the bucket can have a token again."""

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from modelgrid.client.errors import ResourceExhausted, Unauthenticated
from services.gateway.auth import Authorizer, Scope
from services.gateway.keycache import KeyCache
from services.kit.redis_client import create_redis

pytestmark = pytest.mark.asyncio(loop_scope="session")

PREDICT = "/modelgrid.predictor.v1.Predictor/Predict"
CACHE_SECONDS = 5.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


@pytest_asyncio.fixture(loop_scope="session")
async def instances(redis_server, unique) -> AsyncIterator[Callable[..., Authorizer]]:
    """`make(**options)`: a gateway instance's Authorizer (auth on) over the session's Redis; every one made in a
    test shares the same keys and buckets, as the instances of one deployment do."""
    redis = create_redis(redis_server.url)
    prefix = f"{unique('auth-cache')}:"

    def make(**options) -> Authorizer:
        options = {"key_cache_seconds": CACHE_SECONDS, "default_rate": 1000.0, "burst_seconds": 1.0, **options}
        return Authorizer(redis, enabled=True, admin_key="", prefix=prefix, **options)

    make.redis, make.prefix = redis, prefix  # type: ignore[attr-defined]
    yield make
    await redis.aclose()


async def test_a_cached_key_needs_no_redis_read_and_a_revoked_key_is_refused_after_the_bound(instances):
    clock = Clock()
    here, elsewhere = instances(clock=clock), instances()
    key, secret = await elsewhere.create_key("client", [Scope.PREDICT], 0)
    assert (await here.check(PREDICT, bearer(secret))).key_id == key.id  # read from Redis, then kept
    await elsewhere.revoke_key(key.id)  # through another instance: Redis says revoked, this one does not read it
    clock.now += CACHE_SECONDS - 0.1
    assert (await here.check(PREDICT, bearer(secret))).name == "client"  # no Redis read within the bound
    clock.now += 0.1
    with pytest.raises(Unauthenticated):
        await here.check(PREDICT, bearer(secret))
    clock.now += 3600
    with pytest.raises(Unauthenticated):  # and never again
        await here.check(PREDICT, bearer(secret))


async def test_a_key_revoked_through_the_same_instance_is_refused_at_once(instances):
    here = instances(clock=Clock())
    key, secret = await here.create_key("client", [Scope.PREDICT], 0)
    await here.check(PREDICT, bearer(secret))
    await here.revoke_key(key.id)
    with pytest.raises(Unauthenticated):
        await here.check(PREDICT, bearer(secret))


async def test_a_wrong_secret_is_never_taken_for_a_cached_key(instances):
    here = instances(clock=Clock())
    key, secret = await here.create_key("client", [Scope.PREDICT], 0)
    await here.check(PREDICT, bearer(secret))
    for wrong in (f"{key.id}.wrong", f"{key.id}.{secret.split('.', 1)[1][:-1]}", key.id, f"{secret}x"):
        with pytest.raises(Unauthenticated):
            await here.check(PREDICT, bearer(wrong))
    assert (await here.check(PREDICT, [("x-api-key", secret)])).key_id == key.id  # the right one still is


async def test_refusals_are_not_kept_and_the_cache_is_bounded(instances):
    clock = Clock()
    here = instances(clock=clock, key_cache_size=2)
    for _ in range(50):  # a spray of made-up keys: refused, each after a Redis read, and none kept
        with pytest.raises(Unauthenticated):
            await here.check(PREDICT, bearer(f"{secrets.token_hex(6)}.{secrets.token_urlsafe(24)}"))
    assert len(here.keys) == 0
    made = [await here.create_key(f"k{i}", [Scope.PREDICT], 0) for i in range(3)]
    for _, secret in made:
        await here.check(PREDICT, bearer(secret))
    assert len(here.keys) == 2
    for _, secret in made:  # the one that went is read again: every key still works
        await here.check(PREDICT, bearer(secret))


async def test_a_revocation_racing_a_read_leaves_nothing_cached():
    """An answer read from Redis before a key was forgotten (revoked here) is not kept: it may predate the
    revocation."""
    cache: KeyCache[str] = KeyCache(CACHE_SECONDS, 10, Clock())
    epoch = cache.epoch  # a call reads this, then asks Redis...
    cache.forget("k1")  # ...while the key is revoked through this instance
    cache.put("k1", "digest", "identity", epoch)
    assert cache.get("k1", "digest") is None
    cache.put("k1", "digest", "identity", cache.epoch)
    assert cache.get("k1", "digest") == "identity"


async def test_no_caching_when_the_setting_is_zero(instances):
    here = instances(key_cache_seconds=0)
    key, secret = await here.create_key("client", [Scope.PREDICT], 0)
    await here.check(PREDICT, bearer(secret))
    assert len(here.keys) == 0
    await instances().revoke_key(key.id)
    with pytest.raises(Unauthenticated):
        await here.check(PREDICT, bearer(secret))


# -- rate limits: leases from the shared bucket -----------------------------------------------------------------


async def bucket_tokens(instances, key_id: str) -> float:
    return float(await instances.redis.hget(f"{instances.prefix}bucket:{key_id}", "tokens"))


async def test_a_lease_takes_a_few_tokens_and_spends_them_without_redis(instances):
    here = instances(rate_lease_tokens=5, rate_lease_seconds=1.0)
    key, secret = await here.create_key("client", [Scope.PREDICT], 100)  # a bucket of 100 tokens
    started = time.monotonic()
    await here.check(PREDICT, bearer(secret))
    assert here.limiter.held(key.id) == 4
    assert await bucket_tokens(instances, key.id) == 95  # five taken from a full bucket
    for _ in range(4):
        await here.check(PREDICT, bearer(secret))
    assert await bucket_tokens(instances, key.id) == 95  # spent here: Redis was not asked
    await here.check(PREDICT, bearer(secret))
    refilled = 100 * (time.monotonic() - started)
    assert here.limiter.held(key.id) == 4 and 90 <= await bucket_tokens(instances, key.id) <= 90 + refilled


async def test_a_low_rate_takes_one_token_per_call(instances):
    here = instances(rate_lease_tokens=20, rate_lease_seconds=0.1)
    assert [here.limiter.lease_size(rate) for rate in (1, 5, 19.9, 20, 100, 1e6)] == [1, 1, 1, 2, 10, 20]


async def test_concurrent_calls_share_one_refill(instances):
    here = instances(rate_lease_tokens=5, rate_lease_seconds=1.0)
    key, secret = await here.create_key("client", [Scope.PREDICT], 100)
    started = time.monotonic()
    await asyncio.gather(*(here.check(PREDICT, bearer(secret)) for _ in range(10)))
    refilled = 100 * (time.monotonic() - started)
    assert here.limiter.held(key.id) == 0
    assert 90 <= await bucket_tokens(instances, key.id) <= 90 + refilled  # two refills of five, not ten of five


async def test_instances_share_the_limit_and_hold_no_more_than_their_lease(instances):
    rate, lease = 10.0, 3
    gateways = [instances(rate_lease_tokens=lease, rate_lease_seconds=1.0) for _ in range(2)]
    key, secret = await gateways[0].create_key("client", [Scope.PREDICT], rate)
    started = time.monotonic()
    admitted = refused = 0
    for i in range(60):
        try:
            await gateways[i % 2].check(PREDICT, bearer(secret))
            admitted += 1
        except ResourceExhausted as exc:
            assert "retry in" in str(exc)
            refused += 1
    elapsed = time.monotonic() - started
    assert refused > 0
    assert all(g.limiter.held(key.id) < lease for g in gateways)
    assert admitted <= rate * 1.0 + rate * elapsed + 1  # the bucket and what refilled: leases add nothing here


async def test_a_refusal_holds_until_the_bucket_can_have_a_token(instances):
    clock = Clock()
    here = instances(clock=clock, rate_lease_tokens=5, rate_lease_seconds=1.0)
    key, secret = await here.create_key("client", [Scope.PREDICT], 1)  # one token, one more per second
    await here.check(PREDICT, bearer(secret))
    with pytest.raises(ResourceExhausted) as refused:
        await here.check(PREDICT, bearer(secret))
    wait_ms = int(str(refused.value).rsplit("retry in ", 1)[1].split()[0])
    assert 900 <= wait_ms <= 1000
    await instances.redis.hset(f"{instances.prefix}bucket:{key.id}", "tokens", 1)  # a token Redis would give...
    with pytest.raises(ResourceExhausted):
        await here.check(PREDICT, bearer(secret))  # ...is not asked for before the wait is over
    clock.now += wait_ms / 1000
    await here.check(PREDICT, bearer(secret))
