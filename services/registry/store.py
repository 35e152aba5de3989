"""Registry metadata in Redis. Every change is one optimistic transaction (WATCH/MULTI/EXEC) that also appends
its event to the global event stream and to the model's history stream, so state and events never disagree.

Keys (after the configured prefix):
  models                    sorted set of model names (lexicographic listing)
  model:{name}              JSON of the RegisteredModel
  model:{name}:seq          last version number assigned; kept after a delete so numbers are never reused
  model:{name}:versions     hash: version number -> JSON of the ModelVersion
  model:{name}:aliases      hash: alias -> version number
  model:{name}:requests     hash: client request id -> version number (idempotent CreateVersion)
  model:{name}:history      stream: the model's audit trail (kept after a delete)
  events                    stream: every change, for WatchEvents

Writes that must not be lost (creating a model, committing a version, setting, moving or deleting an alias) are
guarded (kit.redis_client.guarded_pipeline): with redis_min_replicas above 0 their transaction is followed, on the same
connection, by WAIT for that many replicas, and fails with UNAVAILABLE (applied on the primary, not acknowledged)
when too few answer within redis_replica_ack_timeout_ms.
"""

import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, WatchError

from modelgrid.client.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from modelgrid.client.registry.types import (
    Alias,
    EventType,
    ModelVersion,
    RegisteredModel,
    RegistryEvent,
    VersionStatus,
)
from services.kit.redis_client import guarded_pipeline, is_demoted_primary, is_outage
from services.registry.records import model_from_json, to_json, version_from_json

T = TypeVar("T")
DEMOTED_RETRIES = 3
"""How often a transaction that a demoted primary refused (READONLY) is run again on the primary the sentinels name."""
Pipeline = aioredis.client.Pipeline


class RegistryStore:
    """Reads and atomically changes registry metadata."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "mg:registry:", events_max_length: int = 1_000_000):
        self._redis = redis
        self._prefix = prefix
        self._events_max_length = events_max_length
        self.events_key = f"{prefix}events"

    # -- keys --------------------------------------------------------------------------------------------------

    def _k(self, name: str, part: str = "") -> str:
        return f"{self._prefix}model:{name}" + (f":{part}" if part else "")

    @property
    def _models_key(self) -> str:
        return f"{self._prefix}models"

    # -- transactions ------------------------------------------------------------------------------------------

    async def _transact(
        self, watch: list[str], body: Callable[[Pipeline], Awaitable[T]], *, guarded: bool = False
    ) -> T:
        """Runs body(pipe) with `watch` keys watched: body reads, raises domain errors or calls pipe.multi() and
        queues writes. Retries when another client changed a watched key in between, or when the connection
        dropped before MULTI/EXEC was sent. A connection lost during MULTI/EXEC leaves the outcome unknown (Redis
        may have applied it and died before answering): that is Unavailable, never a second run, which could
        apply the change twice or answer AlreadyExists/FailedPrecondition for a change that was applied. A primary
        that a fail-over made a replica refuses the write (READONLY: nothing written); it runs again on the primary
        the sentinels name now, DEMOTED_RETRIES times at most.
        `guarded`: a write that must not be lost; it waits for the replicas the client's WriteGuard asks for and
        raises ReplicaNotAcknowledged (UNAVAILABLE) after it is applied when they do not acknowledge it in time."""
        pipeline = guarded_pipeline(self._redis) if guarded else self._redis.pipeline(transaction=True)
        demoted = 0
        async with pipeline as pipe:
            while True:
                try:
                    await pipe.watch(*watch)
                    result = await body(pipe)
                except WatchError:  # redis-py's word for "the connection dropped while watching": nothing written
                    continue
                try:
                    await pipe.execute()
                    return result
                except WatchError as exc:
                    lost = exc.__context__  # the connection error redis-py turned into a WatchError, if any
                    if is_demoted_primary(lost) and demoted < DEMOTED_RETRIES:
                        demoted += 1  # READONLY from the old primary after a fail-over: nothing was written
                        continue
                    if lost is not None and is_outage(lost) and not isinstance(lost, BusyLoadingError):
                        raise Unavailable(
                            "the registry's state store (Redis) went away while this change was being committed; "
                            "it may or may not have been applied: read it back, then retry in a few seconds"
                        ) from lost
                    continue

    def _queue_event(self, pipe: Pipeline, event: RegistryEvent) -> None:
        fields = {
            "type": event.type.value,
            "model": event.model_name,
            "version": event.version,
            "alias": event.alias,
            "previous_version": event.previous_version,
            "actor": event.actor,
            "time": repr(event.time),
            "details": json.dumps(event.details),
        }
        pipe.xadd(self.events_key, fields, maxlen=self._events_max_length, approximate=True)
        pipe.xadd(self._k(event.model_name, "history"), fields)

    @staticmethod
    def _event_from_fields(cursor: str, fields: dict[str, str]) -> RegistryEvent:
        return RegistryEvent(
            type=EventType(fields["type"]),
            model_name=fields["model"],
            version=int(fields["version"]),
            alias=fields["alias"],
            previous_version=int(fields["previous_version"]),
            actor=fields["actor"],
            time=float(fields["time"]),
            details=json.loads(fields["details"]),
            cursor=cursor,
        )

    # -- models ------------------------------------------------------------------------------------------------

    async def create_model(self, model: RegisteredModel, actor: str) -> RegisteredModel:
        """Stores a new model; AlreadyExists when the name is taken."""
        key = self._k(model.name)

        async def body(pipe: Pipeline) -> RegisteredModel:
            if await pipe.exists(key):
                raise AlreadyExists(f"model {model.name!r} already exists")
            model.created_at = model.updated_at = time.time()
            pipe.multi()
            pipe.set(key, to_json(model))
            pipe.zadd(self._models_key, {model.name: 0})
            self._queue_event(pipe, RegistryEvent(EventType.MODEL_CREATED, model.name, actor, model.created_at))
            return model

        return await self._transact([key], body, guarded=True)

    async def get_model(self, name: str) -> RegisteredModel:
        """A model with its aliases and latest version number; NotFound when absent."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self._k(name)).hgetall(self._k(name, "aliases")).get(self._k(name, "seq"))
            raw, aliases, seq = await pipe.execute()
        if raw is None:
            raise NotFound(f"model {name!r} not found")
        model = model_from_json(raw)
        model.aliases = {a: int(v) for a, v in aliases.items()}
        model.latest_version = int(seq or 0)
        return model

    async def list_models(self, prefix: str, after: str, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` model names after `after` starting with `prefix`, and whether more may follow."""
        low = f"({after}" if after and after >= prefix else f"[{prefix}"
        high = f"[{prefix}\xff" if prefix else "+"
        names = await self._redis.zrangebylex(self._models_key, low, high, start=0, num=limit + 1)
        return names[:limit], len(names) > limit

    async def update_model(
        self, name: str, change: Callable[[RegisteredModel], dict[str, str]], actor: str
    ) -> RegisteredModel:
        """Applies change(model) (which returns the event details) atomically."""
        key = self._k(name)

        async def body(pipe: Pipeline) -> None:
            raw = await pipe.get(key)
            if raw is None:
                raise NotFound(f"model {name!r} not found")
            model = model_from_json(raw)
            details = change(model)
            model.updated_at = time.time()
            pipe.multi()
            pipe.set(key, to_json(model))
            self._queue_event(
                pipe, RegistryEvent(EventType.MODEL_UPDATED, name, actor, model.updated_at, details=details)
            )

        await self._transact([key], body)
        return await self.get_model(name)

    async def delete_model(self, name: str, force: bool, actor: str) -> int:
        """Deletes a model and its version records; refuses while aliases exist unless forced. Returns the number
        of versions removed. The version counter and the history stay, so numbers are never reused."""
        key, aliases_key, versions_key = self._k(name), self._k(name, "aliases"), self._k(name, "versions")

        async def body(pipe: Pipeline) -> int:
            if not await pipe.exists(key):
                raise NotFound(f"model {name!r} not found")
            aliases = await pipe.hgetall(aliases_key)
            if aliases and not force:
                raise FailedPrecondition(
                    f"model {name!r} still has aliases {sorted(aliases)}; delete them first or pass force"
                )
            count = await pipe.hlen(versions_key)
            pipe.multi()
            pipe.delete(key, aliases_key, versions_key, self._k(name, "requests"))
            pipe.zrem(self._models_key, name)
            details = {"versions": str(count), "aliases": ",".join(sorted(aliases))}
            self._queue_event(pipe, RegistryEvent(EventType.MODEL_DELETED, name, actor, time.time(), details=details))
            return count

        return await self._transact([key, aliases_key, versions_key], body)

    # -- versions ----------------------------------------------------------------------------------------------

    async def commit_version(self, version: ModelVersion, request_id: str) -> tuple[ModelVersion, bool]:
        """Assigns the next number and stores the version; returns (version, created). With a request id that
        was seen before, returns the version it created and False."""
        name = version.model_name
        key, seq_key, requests_key = self._k(name), self._k(name, "seq"), self._k(name, "requests")

        async def body(pipe: Pipeline) -> tuple[int, bool]:
            raw_model = await pipe.get(key)  # read under WATCH, like every value the transaction writes back
            if raw_model is None:
                raise NotFound(f"model {name!r} not found; create it first")
            if request_id and (earlier := await pipe.hget(requests_key, request_id)) is not None:
                return int(earlier), False
            number = int(await pipe.get(seq_key) or 0) + 1
            version.version = number
            version.created_at = version.updated_at = time.time()
            pipe.multi()
            pipe.set(seq_key, number)
            pipe.hset(self._k(name, "versions"), str(number), to_json(version))
            if request_id:
                pipe.hset(requests_key, request_id, number)
            pipe.set(key, _touch(raw_model))
            details = {"digest": version.artifact.digest, "size_bytes": str(version.artifact.size_bytes)}
            self._queue_event(
                pipe,
                RegistryEvent(
                    EventType.VERSION_CREATED, name, version.created_by, version.created_at, number, details=details
                ),
            )
            return number, True

        number, created = await self._transact([key, seq_key, requests_key], body, guarded=True)
        return await self.get_version(name, number), created

    async def get_version(self, name: str, number: int) -> ModelVersion:
        """One version with the aliases pointing at it; NotFound when the model or version is absent."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self._k(name)).hget(self._k(name, "versions"), str(number)).hgetall(self._k(name, "aliases"))
            exists, raw, aliases = await pipe.execute()
        if not exists:
            raise NotFound(f"model {name!r} not found")
        if raw is None:
            raise NotFound(f"model {name!r} has no version {number}")
        version = version_from_json(raw)
        version.aliases = sorted(a for a, v in aliases.items() if int(v) == number)
        return version

    async def list_versions(self, name: str) -> list[ModelVersion]:
        """Every version of a model, newest first, with their aliases."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self._k(name)).hgetall(self._k(name, "versions")).hgetall(self._k(name, "aliases"))
            exists, raw, aliases = await pipe.execute()
        if not exists:
            raise NotFound(f"model {name!r} not found")
        versions = sorted((version_from_json(v) for v in raw.values()), key=lambda v: v.version, reverse=True)
        for version in versions:
            version.aliases = sorted(a for a, n in aliases.items() if int(n) == version.version)
        return versions

    async def update_version(
        self, name: str, number: int, change: Callable[[ModelVersion, dict[str, int]], dict[str, str]], actor: str
    ) -> ModelVersion:
        """Applies change(version, aliases) (which returns the event details) atomically."""
        versions_key, aliases_key = self._k(name, "versions"), self._k(name, "aliases")

        async def body(pipe: Pipeline) -> None:
            raw = await pipe.hget(versions_key, str(number))
            if raw is None:
                await self.get_version(name, number)  # raises the precise NotFound
            version = version_from_json(raw)
            aliases = {a: int(v) for a, v in (await pipe.hgetall(aliases_key)).items()}
            details = change(version, aliases)
            version.updated_at = time.time()
            pipe.multi()
            pipe.hset(versions_key, str(number), to_json(version))
            self._queue_event(
                pipe, RegistryEvent(EventType.VERSION_UPDATED, name, actor, version.updated_at, number, details=details)
            )

        await self._transact([versions_key, aliases_key], body)
        return await self.get_version(name, number)

    # -- aliases -----------------------------------------------------------------------------------------------

    async def set_alias(self, name: str, alias: str, number: int, expected: int | None, actor: str) -> Alias:
        """Points `alias` at READY version `number`; with `expected` set, only if the alias points at it now
        (0: unset), else FailedPrecondition."""
        versions_key, aliases_key = self._k(name, "versions"), self._k(name, "aliases")

        async def body(pipe: Pipeline) -> Alias:
            raw = await pipe.hget(versions_key, str(number))
            if raw is None:
                await self.get_version(name, number)  # raises the precise NotFound
            status = version_from_json(raw).status
            if status != VersionStatus.READY:
                raise FailedPrecondition(f"version {number} of {name!r} is {status.value}; aliases need READY")
            current = int(await pipe.hget(aliases_key, alias) or 0)
            if expected is not None and current != expected:
                now = f"points at version {current}" if current else "is unset"
                raise FailedPrecondition(
                    f"alias {alias!r} of {name!r} {now}, not {expected or 'unset'} as expected; read it and retry"
                )
            pipe.multi()
            pipe.hset(aliases_key, alias, number)
            self._queue_event(
                pipe,
                RegistryEvent(
                    EventType.ALIAS_SET, name, actor, time.time(), number, alias=alias, previous_version=current
                ),
            )
            return Alias(name, alias, number, current)

        return await self._transact([versions_key, aliases_key, self._k(name)], body, guarded=True)

    async def delete_alias(self, name: str, alias: str, actor: str) -> int:
        """Removes an alias and returns the version it pointed at; NotFound when it is not set."""
        aliases_key = self._k(name, "aliases")

        async def body(pipe: Pipeline) -> int:
            current = await pipe.hget(aliases_key, alias)
            if current is None:
                await self.get_model(name)  # NotFound for the model first
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            pipe.multi()
            pipe.hdel(aliases_key, alias)
            self._queue_event(
                pipe,
                RegistryEvent(
                    EventType.ALIAS_DELETED, name, actor, time.time(), alias=alias, previous_version=int(current)
                ),
            )
            return int(current)

        return await self._transact([aliases_key], body, guarded=True)

    async def alias_target(self, name: str, alias: str) -> int:
        """The version an alias points at; NotFound when the model or alias is absent."""
        number = await self._redis.hget(self._k(name, "aliases"), alias)
        if number is None:
            await self.get_model(name)
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        return int(number)

    # -- events ------------------------------------------------------------------------------------------------

    async def last_cursor(self) -> str:
        """Cursor of the newest event ("0-0" when there is none)."""
        newest = await self._redis.xrevrange(self.events_key, count=1)
        return newest[0][0] if newest else "0-0"

    async def events_after(self, cursor: str, count: int, block_ms: int) -> list[RegistryEvent]:
        """Events after `cursor`, waiting up to block_ms for the first one."""
        reply = await self._redis.xread({self.events_key: cursor}, count=count, block=block_ms)
        if not reply:
            return []
        return [self._event_from_fields(entry_id, fields) for entry_id, fields in reply[0][1]]

    async def history(self, name: str, after: str, count: int) -> list[RegistryEvent]:
        """Up to `count` history events of a model after the cursor `after` (oldest first)."""
        low = f"({after}" if after else "-"
        entries = await self._redis.xrange(self._k(name, "history"), min=low, max="+", count=count)
        return [self._event_from_fields(entry_id, fields) for entry_id, fields in entries]


def _touch(raw_model: str | None) -> str:
    """The model's JSON with updated_at set to now."""
    model = model_from_json(raw_model)
    model.updated_at = time.time()
    return to_json(model)
