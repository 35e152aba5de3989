"""Service discovery over Consul: a watched, cached list of the healthy instances of one service (kit.channels
opens a channel to each)."""

import asyncio
import logging
from collections.abc import Callable, Sequence

import httpx

from services.kit.consul import ConsulClient, Instance

logger = logging.getLogger(__name__)


class ServiceResolver:
    """Keeps the healthy instances of one service up to date with Consul blocking queries.

    `instances` is the cached answer; listeners are called on every change. A Consul outage keeps the last
    answer (stale but useful) and retries with backoff.
    """

    def __init__(self, consul: ConsulClient, service: str, *, wait: str = "30s") -> None:
        self.service = service
        self._consul = consul
        self._wait = wait
        self._instances: tuple[Instance, ...] = ()
        self._listeners: list[Callable[[Sequence[Instance]], None]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    @property
    def instances(self) -> tuple[Instance, ...]:
        """The healthy instances at the last answer from Consul."""
        return self._instances

    def add_listener(self, listener: Callable[[Sequence[Instance]], None]) -> None:
        """Calls listener(instances) after every change."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Fetches the first answer, then watches in the background."""
        index, instances = await self._consul.healthy_instances(self.service)
        await self._update(instances)
        self._task = asyncio.create_task(self._watch(index), name=f"watch-{self.service}")

    async def wait_for(self, predicate: Callable[[Sequence[Instance]], bool], timeout: float) -> tuple[Instance, ...]:
        """Waits until predicate(instances) holds; raises TimeoutError after `timeout` seconds."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self._instances)), timeout)
            return self._instances

    async def _watch(self, index: int) -> None:
        backoff = 0.5
        while True:
            try:
                index, instances = await self._consul.healthy_instances(self.service, index=index, wait=self._wait)
                backoff = 0.5
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("watching %s in Consul failed (%s); retrying in %.1fs", self.service, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                index = 0
                continue
            if tuple(sorted(instances, key=lambda i: i.id)) != self._instances:
                await self._update(instances)

    async def _update(self, instances: Sequence[Instance]) -> None:
        self._instances = tuple(sorted(instances, key=lambda i: i.id))
        logger.info("%s instances: %s", self.service, [i.target for i in self._instances] or "none")
        for listener in self._listeners:
            listener(self._instances)
        async with self._changed:
            self._changed.notify_all()

    async def stop(self) -> None:
        """Stops watching."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
