"""API keys, rate limits and limits on open streams.

A key is "<id>.<secret>"; Redis keeps only sha256 of the whole key, with its name, scopes and rate. Keys travel
as `authorization: Bearer <key>` or `x-api-key: <key>`. Each method needs a scope (ADMIN covers every scope).
A key checked in Redis is trusted for a few seconds without reading it again (keycache.py: a key revoked elsewhere
is refused within that bound). Rate limits are token buckets in Redis, so every gateway instance draws from the
same bucket per key, in small leases (ratelimit.py). Open streaming calls are counted per key (per address with
auth off) in each gateway instance (streams.py).
"""

import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from modelgrid.client.errors import NotFound, PermissionDenied, Unauthenticated
from services.gateway.keycache import KeyCache
from services.gateway.ratelimit import RateLimiter
from services.gateway.streams import OpenStreams, StreamSlot, peer_host
from services.kit.redis_client import is_outage, outage_error

logger = logging.getLogger(__name__)


class Scope(enum.StrEnum):
    READ = "READ"
    PREDICT = "PREDICT"
    TRAIN = "TRAIN"
    ADMIN = "ADMIN"


ALL_SCOPES = frozenset(Scope)

# Explicit needs; a method not listed needs READ when its name reads (Get, List, Watch...), ADMIN otherwise.
_NEEDS: dict[str, frozenset[Scope]] = {
    "/modelgrid.registry.v1.ModelRegistry/UploadBlob": frozenset({Scope.PREDICT, Scope.TRAIN}),
    "/modelgrid.registry.v1.ModelRegistry/StatUpload": frozenset({Scope.PREDICT, Scope.TRAIN}),
    "/modelgrid.predictor.v1.Predictor/Predict": frozenset({Scope.PREDICT}),
    "/modelgrid.predictor.v1.Predictor/PredictStream": frozenset({Scope.PREDICT}),
    "/modelgrid.predictor.v1.Predictor/BatchPredict": frozenset({Scope.PREDICT}),
    "/modelgrid.predictor.v1.Predictor/CancelBatchJob": frozenset({Scope.PREDICT}),
    "/inference.GRPCInferenceService/ModelInfer": frozenset({Scope.PREDICT}),
    "/inference.GRPCInferenceService/ModelStreamInfer": frozenset({Scope.PREDICT}),
    "/tensorflow.serving.PredictionService/Predict": frozenset({Scope.PREDICT}),
    "/tensorflow.serving.PredictionService/Classify": frozenset({Scope.PREDICT}),
    "/tensorflow.serving.PredictionService/Regress": frozenset({Scope.PREDICT}),
    "/tensorflow.serving.PredictionService/MultiInference": frozenset({Scope.PREDICT}),
    "/modelgrid.trainer.v1.Trainer/SubmitJob": frozenset({Scope.TRAIN}),
    "/modelgrid.trainer.v1.Trainer/CancelJob": frozenset({Scope.TRAIN}),
    # Registering a model or a version, training recipes among them (a model tagged modelgrid.kind=recipe, whose
    # versions are Python source every training worker runs), is ADMIN's alone: a TRAIN key may upload a blob but
    # not make it a recipe.
    "/modelgrid.registry.v1.ModelRegistry/CreateModel": frozenset({Scope.ADMIN}),
    "/modelgrid.registry.v1.ModelRegistry/CreateVersion": frozenset({Scope.ADMIN}),
    "/modelgrid.registry.v1.ModelRegistry/UpdateModel": frozenset({Scope.ADMIN}),
}
_READ_VERBS = tuple("Get List Watch Resolve Download Stat Server ModelReady ModelMetadata RepositoryIndex".split())
_READ_LIKE = frozenset({Scope.READ, Scope.PREDICT, Scope.TRAIN})
_KEY_ADMIN = tuple(f"/modelgrid.gateway.v1.GatewayAdmin/{m}" for m in ("CreateApiKey", "ListApiKeys", "RevokeApiKey"))


def scopes_needed(method: str) -> frozenset[Scope]:
    """Any one of these scopes (or ADMIN) allows the call. The gateway's own API keys are ADMIN's alone, listing
    them included."""
    if method in _NEEDS:
        return _NEEDS[method]
    if method.startswith(_KEY_ADMIN):
        return frozenset({Scope.ADMIN})
    name = method.rsplit("/", 1)[-1]
    return _READ_LIKE if name.startswith(_READ_VERBS) else frozenset({Scope.ADMIN})


@dataclass
class ApiKey:
    id: str
    name: str
    scopes: list[Scope]
    rate_limit: float = 0.0
    created_at: float = 0.0
    revoked: bool = False
    key_hash: str = field(default="", repr=False)


@dataclass(frozen=True)
class Identity:
    """Who is calling: recorded as x-modelgrid-client by the backends."""

    name: str
    scopes: frozenset[Scope]
    key_id: str = ""
    rate_limit: float = 0.0


ADMIN = Identity("admin", ALL_SCOPES)
"""The bootstrap admin key's identity."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Authorizer:
    """Checks keys, scopes and rates; creates and revokes keys."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        enabled: bool,
        admin_key: str,
        default_rate: float,
        burst_seconds: float,
        prefix: str = "mg:gateway:",
        max_streams: int = 16,
        key_cache_seconds: float = 0.0,
        key_cache_size: int = 10_000,
        rate_lease_tokens: int = 1,
        rate_lease_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`key_cache_seconds` 0 and `rate_lease_tokens` 1 (the defaults here; the settings' defaults are others)
        read each key and take each token in Redis on every call. `clock` (monotonic seconds) times both."""
        self._redis = redis
        self.enabled = enabled
        self._admin_hash = _hash(admin_key) if admin_key else ""
        self._default_rate = default_rate
        self._prefix = prefix
        self.keys: KeyCache[Identity] = KeyCache(key_cache_seconds, key_cache_size, clock)
        self.limiter = RateLimiter(
            redis,
            prefix=prefix,
            burst_seconds=burst_seconds,
            lease_tokens=rate_lease_tokens,
            lease_seconds=rate_lease_seconds,
            max_keys=key_cache_size,
            clock=clock,
        )
        self.streams = OpenStreams(max_streams)

    async def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The caller's identity if it may make this call now; Unauthenticated, PermissionDenied or
        ResourceExhausted (with the wait in the message) otherwise."""
        if not self.enabled:
            name = "anonymous"
            for key, value in metadata:
                if key.lower() == "x-modelgrid-client" and isinstance(value, str):
                    name = value  # the last one wins
            return Identity(name, ALL_SCOPES)
        secret = auth = ""
        for key, value in metadata:  # the last one of each wins
            if isinstance(value, str):
                key = key.lower()
                if key == "x-api-key":
                    secret = value
                elif key == "authorization":
                    auth = value
        if not secret and auth.lower().startswith("bearer "):
            secret = auth[7:].strip()
        if not secret:
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>` or `x-api-key: <key>`")
        try:
            identity = await self._identify(secret)
            needed = scopes_needed(method)
            if Scope.ADMIN not in identity.scopes and not needed & identity.scopes:
                raise PermissionDenied(
                    f"key {identity.name!r} has scopes {sorted(identity.scopes)}; "
                    f"{method} needs one of {sorted(needed)}"
                )
            if identity.key_id:
                await self.limiter.take(identity.key_id, identity.name, identity.rate_limit or self._default_rate)
        except RedisError as exc:
            # Keys and buckets live in Redis: while it is down both fronts answer UNAVAILABLE (retryable), not INTERNAL.
            if not is_outage(exc):
                raise
            raise outage_error(exc, "gateway") from exc
        return identity

    def open_stream(self, identity: Identity, peer: str | None) -> StreamSlot:
        """A slot for one more streaming call of this caller (see streams.py), or ResourceExhausted. The caller is
        its API key; with auth off, its address (`peer`, as gRPC or the web front gives it): names sent in
        x-modelgrid-client cost nothing to change."""
        if not self.enabled:
            host = peer_host(peer)
            return self.streams.open(f"peer:{host}", f"caller {host} (auth is off: callers are told apart by address)")
        if identity.key_id:
            return self.streams.open(f"key:{identity.key_id}", f"API key {identity.name!r}")
        return self.streams.open("admin", "the admin key")

    async def _identify(self, secret: str) -> Identity:
        digest = _hash(secret)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return ADMIN
        key_id = secret.split(".", 1)[0]
        identity = self.keys.get(key_id, digest)
        if identity is not None:
            return identity
        epoch = self.keys.epoch
        raw = await self._redis.get(f"{self._prefix}key:{key_id}") if key_id.isalnum() else None
        key = ApiKey(**json.loads(raw)) if raw else None
        if key is None or key.revoked or not hmac.compare_digest(digest, key.key_hash):
            raise Unauthenticated("invalid or revoked API key")  # never cached: see keycache.py
        identity = Identity(key.name, frozenset(Scope(s) for s in key.scopes), key.id, key.rate_limit)
        self.keys.put(key_id, digest, identity, epoch)
        return identity

    # -- administration ----------------------------------------------------------------------------------------

    async def create_key(self, name: str, scopes: list[Scope], rate_limit: float) -> tuple[ApiKey, str]:
        key_id = secrets.token_hex(6)
        secret = f"{key_id}.{secrets.token_urlsafe(24)}"
        key = ApiKey(key_id, name, list(scopes), rate_limit, time.time(), False, _hash(secret))
        await self._redis.set(f"{self._prefix}key:{key_id}", json.dumps(asdict(key)))
        return key, secret

    async def list_keys(self) -> list[ApiKey]:
        keys = []
        async for redis_key in self._redis.scan_iter(match=f"{self._prefix}key:*"):
            raw = await self._redis.get(redis_key)
            if raw:
                keys.append(ApiKey(**json.loads(raw)))
        return sorted(keys, key=lambda k: k.created_at)

    async def revoke_key(self, key_id: str) -> ApiKey:
        raw = await self._redis.get(f"{self._prefix}key:{key_id}")
        if raw is None:
            raise NotFound(f"no API key {key_id!r}")
        key = ApiKey(**json.loads(raw))
        key.revoked = True
        await self._redis.set(f"{self._prefix}key:{key_id}", json.dumps(asdict(key)))
        self.keys.forget(key_id)  # refused here from now on; other instances within their key_cache_seconds
        return key


def admin_key_from_file(path: Path) -> str:
    """The admin key kept in `path`, made and written there first (mode 0600, directory 0700) when the file does
    not exist: a gateway with auth on always has a key its operator can read, and nobody else."""
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key
    key = f"admin.{secrets.token_urlsafe(32)}"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    logger.warning("made an admin API key and wrote it to %s (mode 0600): use it to create other keys", path)
    return key
