"""Service discovery over Consul: a watched, cached list of healthy instances and a channel pool over them."""

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence

import grpc
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


class ChannelPool:
    """One grpc.aio channel per healthy instance of a service; `channel()` spreads calls round robin.

    Channels of instances that leave the healthy set are closed after a grace period so that calls already on
    them can finish.
    """

    def __init__(
        self,
        resolver: ServiceResolver,
        *,
        options: Sequence[tuple[str, object]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        close_grace: float = 30.0,
    ) -> None:
        self._resolver = resolver
        self._options = list(options)
        self._interceptors = list(interceptors)
        self._close_grace = close_grace
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._order = itertools.count()
        resolver.add_listener(self._on_change)

    def channel(self) -> grpc.aio.Channel:
        """A channel to one healthy instance; raises LookupError when there is none."""
        targets = [i.target for i in self._resolver.instances]
        if not targets:
            raise LookupError(f"no healthy instance of {self._resolver.service} in Consul")
        target = targets[next(self._order) % len(targets)]
        channel = self._channels.get(target)
        if channel is None:
            channel = grpc.aio.insecure_channel(target, options=self._options, interceptors=self._interceptors)
            self._channels[target] = channel
        return channel

    def _on_change(self, instances: Sequence[Instance]) -> None:
        alive = {i.target for i in instances}
        for target in [t for t in self._channels if t not in alive]:
            channel = self._channels.pop(target)
            asyncio.get_running_loop().call_later(self._close_grace, asyncio.ensure_future, channel.close())

    async def close(self) -> None:
        """Closes every channel."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
