"""Follows the registry's event stream so that a moved alias or a new version reaches the served models.

The last processed cursor is kept in Redis: a restarted replica resumes after it. Every (re)connection also
reconciles all served models, which covers whatever happened while the stream was down.
"""

import asyncio
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from modelgrid.client.errors import NotFound
from modelgrid.client.registry import AsyncRegistryClient, EventType, RegistryEvent
from modelgrid.client.registry.types import is_recipe
from services.kit.redis_client import is_outage
from services.kit.streams import Backoff, StreamFollower
from services.predictor.control import ModelControl
from services.predictor.domain import VersionPolicy

logger = logging.getLogger(__name__)

AUTO_POLICY = VersionPolicy(latest=1, all_aliases=True)


class RegistryFollower:
    """Turns registry events about served models into reconciliations."""

    def __init__(
        self,
        registry: AsyncRegistryClient,
        control: ModelControl,
        redis: aioredis.Redis,
        cursor_key: str,
        *,
        auto_load: bool = False,
        backoff: Backoff | None = None,
        resync_seconds: float | None = None,
    ) -> None:
        self._registry = registry
        self._control = control
        self._redis = redis
        self._cursor_key = cursor_key
        self._auto_load = auto_load
        self._cursor = ""
        self._stream = StreamFollower(
            "registry-follower",
            self._open,
            self._on_event,
            on_connect=self._resync,
            backoff=backoff,
            resync_seconds=resync_seconds,
        )

    @property
    def ready(self) -> asyncio.Event:
        """Set once the stream was first opened and every served model was scheduled for reconciliation."""
        return self._stream.ready

    async def start(self) -> None:
        """Resumes after the cursor kept in Redis and follows the stream in the background."""
        self._cursor = await self._redis.get(self._cursor_key) or ""
        self._stream.start()

    async def stop(self) -> None:
        await self._stream.stop()

    def _open(self) -> AsyncIterator[RegistryEvent]:
        return self._registry.watch(self._cursor)

    async def _resync(self) -> None:
        """After a (re)connection: reconcile every served model; with auto-load, (re)load every registered one
        under the auto-load policy (which also retries versions that failed), training recipes excepted."""
        self._control.refresh_all()
        if self._auto_load:
            for model in await self._registry.list_models():
                if not is_recipe(model.tags):
                    await self._control.load(model.name, AUTO_POLICY, wait=False)

    async def _on_event(self, event: RegistryEvent) -> None:
        served = self._control.is_served(event.model_name)
        if self._auto_load and not served:
            if event.type == EventType.VERSION_CREATED and await self._servable(event.model_name):
                await self._control.load(event.model_name, AUTO_POLICY, wait=False)
        elif served:
            logger.info("registry: %s on %s", event.type, event.model_name)
            self._control.refresh(event.model_name)
        await self._advance(event.cursor)

    async def _servable(self, name: str) -> bool:
        """Whether auto-load should load a model: not a training recipe, and still registered."""
        try:
            return not is_recipe((await self._registry.get_model(name)).tags)
        except NotFound:
            return False

    async def _advance(self, cursor: str) -> None:
        """Moves the cursor past a processed event: in memory, which a reconnection resumes after, and in Redis,
        which a restarted replica resumes after. While Redis is down the one in memory is enough (the next event
        stores its successor), so an outage never stops the following."""
        self._cursor = cursor
        try:
            await self._redis.set(self._cursor_key, cursor)
        except RedisError as exc:
            if not is_outage(exc):
                raise
            logger.warning("registry follower: could not store the cursor (Redis unavailable: %s)", exc)
