"""Where calls go: the healthy instances of each backend service (watched in Consul), one channel each, the calls
in flight on each, and passive ejection of instances that just failed."""

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from services.kit.consul import ConsulClient, Instance
from services.kit.discovery import ServiceResolver
from services.kit.errors import Unavailable
from services.kit.telemetry import client_interceptors

logger = logging.getLogger(__name__)


@dataclass
class Upstream:
    """One backend instance."""

    instance: Instance
    channel: grpc.aio.Channel
    outstanding: int = 0
    ejected_until: float = 0.0  # time.monotonic()
    ejected_at_wall: float = field(default=0.0)

    @property
    def target(self) -> str:
        return self.instance.target


class Backend:
    """The instances of one Consul service."""

    def __init__(self, service: str, resolver: ServiceResolver, options: Sequence[tuple[str, object]]) -> None:
        self.service = service
        self._resolver = resolver
        self._options = list(options)
        self.upstreams: dict[str, Upstream] = {}
        resolver.add_listener(self._sync)

    def _sync(self, instances: Sequence[Instance]) -> None:
        alive = {i.target: i for i in instances}
        for target in [t for t in self.upstreams if t not in alive]:
            gone = self.upstreams.pop(target)
            logger.info("%s: %s left the routing table", self.service, target)
            asyncio.get_running_loop().call_later(30, asyncio.ensure_future, gone.channel.close())
        for target, instance in alive.items():
            if target in self.upstreams:
                self.upstreams[target].instance = instance  # tags may have changed
            else:
                channel = grpc.aio.insecure_channel(target, options=self._options, interceptors=client_interceptors())
                self.upstreams[target] = Upstream(instance, channel)
                logger.info("%s: %s joined the routing table", self.service, target)

    def pick(self, *, tag: str = "", exclude: Sequence[str] = ()) -> Upstream:
        """The instance with the fewest calls in flight (ties at random), preferring ones carrying `tag`, leaving
        out ejected and excluded ones unless nothing else is left."""
        now = time.monotonic()
        candidates = [u for u in self.upstreams.values() if u.target not in exclude]
        if tag:
            tagged = [u for u in candidates if tag in u.instance.tags]
            candidates = tagged or candidates
        in_rotation = [u for u in candidates if u.ejected_until <= now]
        pool = in_rotation or candidates
        if not pool:
            raise Unavailable(f"no healthy instance of {self.service}")
        fewest = min(u.outstanding for u in pool)
        return random.choice([u for u in pool if u.outstanding == fewest])

    def eject(self, upstream: Upstream, seconds: float) -> None:
        upstream.ejected_until = time.monotonic() + seconds
        upstream.ejected_at_wall = time.time() + seconds
        logger.warning("%s: ejected %s for %.0fs", self.service, upstream.target, seconds)

    async def close(self) -> None:
        await asyncio.gather(*(u.channel.close() for u in self.upstreams.values()), return_exceptions=True)


class Backends:
    """One Backend per Consul service the routes name, created on first use."""

    def __init__(self, consul: ConsulClient, options: Sequence[tuple[str, object]]) -> None:
        self._consul = consul
        self._options = options
        self._backends: dict[str, Backend] = {}
        self._resolvers: list[ServiceResolver] = []
        self._lock = asyncio.Lock()

    async def get(self, service: str) -> Backend:
        backend = self._backends.get(service)
        if backend is None:
            async with self._lock:
                backend = self._backends.get(service)
                if backend is None:
                    resolver = ServiceResolver(self._consul, service)
                    backend = Backend(service, resolver, self._options)
                    await resolver.start()
                    self._resolvers.append(resolver)
                    self._backends[service] = backend
        return backend

    @property
    def all(self) -> dict[str, Backend]:
        return dict(self._backends)

    async def close(self) -> None:
        for resolver in self._resolvers:
            await resolver.stop()
        for backend in self._backends.values():
            await backend.close()
