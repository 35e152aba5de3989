"""Where calls go: one kit InstancePool per backend service the routes name (the healthy instances in Consul with a
channel each, the calls in flight on each, passive ejection), picking the instance with the fewest calls in flight."""

import asyncio
from collections.abc import Sequence

from services.kit.channels import InstancePool, fewest_in_flight
from services.kit.consul import ConsulClient
from services.kit.tls import InternalTLS


class Backends:
    """One InstancePool per Consul service, created and started on first use."""

    def __init__(
        self,
        consul: ConsulClient,
        options: Sequence[tuple[str, object]],
        *,
        hold_seconds: float = 60.0,
        tls: InternalTLS | None = None,
    ) -> None:
        self._consul = consul
        self._tls = tls
        self._options = options
        self._hold_seconds = hold_seconds
        self._pools: dict[str, InstancePool] = {}
        self._lock = asyncio.Lock()

    async def get(self, service: str) -> InstancePool:
        """The started pool of a service (the first call asks Consul; it raises when Consul cannot answer)."""
        pool = self._pools.get(service)
        if pool is None:
            async with self._lock:
                pool = self._pools.get(service)
                if pool is None:
                    pool = InstancePool(
                        self._consul,
                        service,
                        picker=fewest_in_flight(),
                        options=self._options,
                        hold_seconds=self._hold_seconds,
                        tls=self._tls,
                    )
                    await pool.start()
                    self._pools[service] = pool
        return pool

    @property
    def all(self) -> dict[str, InstancePool]:
        return dict(self._pools)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
