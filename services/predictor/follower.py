"""Follows the registry's event stream so that a moved alias or a new version reaches the served models.

The last processed cursor is kept in Redis: a restarted replica resumes after it. Every (re)connection also
reconciles all served models, which covers whatever happened while the stream was down.
"""

import asyncio
import logging

import grpc
import redis.asyncio as aioredis

from modelgrid.registry.v1 import registry_pb2 as rpb
from services.predictor.repository import ModelRepository, VersionPolicy
from services.registry.async_client import AsyncRegistryClient

logger = logging.getLogger(__name__)

AUTO_POLICY = VersionPolicy(latest=1, all_aliases=True)


class RegistryFollower:
    """Turns registry events about served models into reconciliations."""

    def __init__(
        self,
        registry: AsyncRegistryClient,
        repository: ModelRepository,
        redis: aioredis.Redis,
        cursor_key: str,
        *,
        auto_load: bool = False,
    ) -> None:
        self._auto_load = auto_load
        self._registry = registry
        self._repository = repository
        self._redis = redis
        self._cursor_key = cursor_key
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        cursor = await self._redis.get(self._cursor_key) or ""
        backoff = 0.5
        while True:
            try:
                stream = self._registry.watch(cursor)
                for name in list(self._repository.models):
                    self._repository.schedule(name)
                if self._auto_load:
                    for name in await self._registry.list_model_names():
                        await self._repository.load(name, AUTO_POLICY, wait=False)
                async for event in stream:
                    if self._auto_load and event.model_name not in self._repository.models:
                        if event.type == rpb.EVENT_TYPE_VERSION_CREATED:
                            await self._repository.load(event.model_name, AUTO_POLICY, wait=False)
                        continue
                    if event.model_name in self._repository.models:
                        logger.info("registry: %s on %s", event.type, event.model_name)
                        self._repository.schedule(event.model_name)
                    cursor = event.cursor
                    await self._redis.set(self._cursor_key, cursor)
                    backoff = 0.5
            except (grpc.aio.AioRpcError, LookupError) as exc:
                detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                logger.warning("registry event stream broke (%s); reconnecting in %.1fs", detail, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
