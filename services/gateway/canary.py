"""Canary weights: the share of a model's stable-alias traffic sent to its canary alias, kept in the registry as a
model tag and followed through the registry's event stream, so a change (or a rollback to 0) applies at once."""

import asyncio
import logging
import random

import grpc

from modelgrid.registry.v1 import registry_pb2 as rpb
from services.registry.async_client import AsyncRegistryClient

logger = logging.getLogger(__name__)


class CanaryWeights:
    """model name -> weight in [0, 1]."""

    def __init__(self, registry: AsyncRegistryClient, tag: str) -> None:
        self._registry = registry
        self._tag = tag
        self.weights: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    def pick_canary(self, model: str) -> bool:
        """True for the share of calls that should go to the canary."""
        weight = self.weights.get(model, 0.0)
        return weight > 0 and random.random() < weight

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="canary-weights")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh(self, name: str) -> None:
        try:
            model = await self._registry.get_model(name)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                self.weights.pop(name, None)
                return
            raise
        self._set(name, model.tags.get(self._tag, ""))

    def _set(self, name: str, raw: str) -> None:
        try:
            weight = min(max(float(raw), 0.0), 1.0) if raw else 0.0
        except ValueError:
            logger.warning("model %s: canary weight tag %r is not a number; ignored", name, raw)
            weight = 0.0
        if weight:
            self.weights[name] = weight
        else:
            self.weights.pop(name, None)

    async def _follow(self) -> None:
        backoff = 0.5
        while True:
            try:
                stream = self._registry.watch("")
                for name in await self._registry.list_model_names():
                    await self._refresh(name)
                self.ready.set()
                async for event in stream:
                    if event.type in (rpb.EVENT_TYPE_MODEL_UPDATED, rpb.EVENT_TYPE_MODEL_CREATED,
                                      rpb.EVENT_TYPE_MODEL_DELETED):  # fmt: skip
                        await self._refresh(event.model_name)
                    backoff = 0.5
            except (grpc.aio.AioRpcError, LookupError) as exc:
                logger.warning("following canary weights failed (%s); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
