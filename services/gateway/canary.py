"""Canary weights: the share of a model's stable-alias traffic sent to its canary alias, kept in the registry as a
model tag and followed through the registry's event stream, so a change (or a rollback to 0) applies at once."""

import asyncio
import logging
import random

from modelgrid.client.errors import NotFound
from modelgrid.client.registry import AsyncRegistryClient, EventType, RegistryEvent
from services.kit.streams import StreamFollower

logger = logging.getLogger(__name__)

_MODEL_EVENTS = frozenset({EventType.MODEL_CREATED, EventType.MODEL_UPDATED, EventType.MODEL_DELETED})


class CanaryWeights:
    """model name -> weight in [0, 1]."""

    def __init__(self, registry: AsyncRegistryClient, tag: str, *, resync_seconds: float | None = None) -> None:
        self._registry = registry
        self._tag = tag
        self.weights: dict[str, float] = {}
        self._cursor = ""  # the last event processed: a reconnection resumes after it ("": from now)
        # Each (re)connection watches from the cursor, then reads every model's tag: no change is missed.
        self._follower = StreamFollower(
            "canary-weights",
            lambda: registry.watch(self._cursor),
            self._on_event,
            on_connect=self._resync,
            resync_seconds=resync_seconds,
        )

    @property
    def ready(self) -> asyncio.Event:
        """Set once the weights have been read."""
        return self._follower.ready

    def pick_canary(self, model: str) -> bool:
        """True for the share of calls that should go to the canary."""
        weight = self.weights.get(model, 0.0)
        return weight > 0 and random.random() < weight

    def start(self) -> None:
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()

    async def _resync(self) -> None:
        names = await self._registry.list_model_names()
        for gone in self.weights.keys() - set(names):  # deleted while the stream was down
            self.weights.pop(gone, None)
        for name in names:
            await self._refresh(name)

    async def _on_event(self, event: RegistryEvent) -> None:
        if event.type in _MODEL_EVENTS:
            await self._refresh(event.model_name)
        self._cursor = event.cursor

    async def _refresh(self, name: str) -> None:
        try:
            model = await self._registry.get_model(name)
        except NotFound:
            self.weights.pop(name, None)
            return
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
