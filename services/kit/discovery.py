"""Service discovery over Consul: a watched, cached list of the healthy instances of one service (kit.channels
opens a channel to each)."""

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence

import httpx

from services.kit.consul import ConsulClient, Instance, duration_seconds
from services.kit.streams import Backoff

logger = logging.getLogger(__name__)


class ServiceResolver:
    """Keeps the healthy instances of one service up to date with Consul blocking queries.

    `instances` is the cached answer; listeners are called on every change.

    The set holds through a blink of the catalog. While Consul fails, the last answer stays, for up to
    `hold_seconds`. When the agent could not be reached at all, or comes back with a reset index (a restarted
    agent that lost its registrations), the instances last seen healthy also stay while their services register
    again: an instance leaves during that time only when the catalog holds it with a failing check, never because
    it is missing. The hold ends when every held instance is back or its time is up. An agent that answers with
    an error (no cluster leader) lost nothing: the servers keep the catalog, so nothing is held after it answers
    again. Outside a blink, an instance that is deregistered (its node left or died) leaves at once.
    """

    def __init__(self, consul: ConsulClient, service: str, *, wait: str = "30s", hold_seconds: float = 60.0) -> None:
        self.service = service
        self._consul = consul
        self._wait = wait
        self._hold_seconds = hold_seconds
        self._instances: tuple[Instance, ...] = ()
        self._listeners: list[Callable[[Sequence[Instance]], None]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._blink_since: float | None = None  # time.monotonic() when the catalog failed or reset

    @property
    def instances(self) -> tuple[Instance, ...]:
        """The healthy instances at the last answer from Consul (and those held through a blink)."""
        return self._instances

    @property
    def holding(self) -> bool:
        """True while instances missing from the catalog are kept because it failed or reset."""
        return self._blink_since is not None

    def add_listener(self, listener: Callable[[Sequence[Instance]], None]) -> None:
        """Calls listener(instances) after every change."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Fetches the first answer, then watches in the background."""
        index, entries = await self._consul.service_health(self.service)
        await self._update([instance for instance, passing in entries if passing], force=True)
        self._task = asyncio.create_task(self._watch(index), name=f"watch-{self.service}")

    async def wait_for(self, predicate: Callable[[Sequence[Instance]], bool], timeout: float) -> tuple[Instance, ...]:
        """Waits until predicate(instances) holds; raises TimeoutError after `timeout` seconds."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self._instances)), timeout)
            return self._instances

    async def _watch(self, index: int) -> None:
        backoff = Backoff(initial=0.5, maximum=5.0)
        failing_since = 0.0  # time.monotonic() of the first of the failures in a row
        while True:
            try:
                new_index, entries = await self._consul.service_health(
                    self.service, index=index, wait=self._query_wait()
                )
            except (httpx.HTTPError, ValueError) as exc:
                failing_since = failing_since or time.monotonic()
                if isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.TimeoutException):
                    self._start_blink()  # the agent is gone: it may come back empty (a restart)
                # else it is slow, or answers but cannot (no cluster leader): the catalog is kept, nothing to hold
                delay = backoff.next()
                logger.warning("watching %s in Consul failed (%s); retrying in %.1fs", self.service, exc, delay)
                await asyncio.sleep(delay)
                index = 0
                if time.monotonic() - failing_since >= self._hold_seconds:
                    await self._end_blink([])  # failing for longer than the hold: the last answer is too old
                continue
            failing_since = 0.0
            backoff.reset()
            if new_index < index:
                self._start_blink()  # the agent restarted: Consul says to start over from index 0
            index = new_index if new_index >= index else 0
            passing = [instance for instance, ok in entries if ok]
            if self._blink_since is None:
                await self._update(passing)
                continue
            present = {instance.id for instance, _ in entries}
            held = [i for i in self._instances if i.id not in present]
            if not held or self._hold_left() == 0:
                await self._end_blink(passing)
            else:
                await self._update([*passing, *held])

    def _query_wait(self) -> str:
        """The blocking query's wait: short while holding, so that the hold ends on time."""
        if self._blink_since is None:
            return self._wait
        return f"{max(1, min(duration_seconds(self._wait), math.ceil(self._hold_left())))}s"

    def _start_blink(self) -> None:
        if self._blink_since is None and self._instances:
            self._blink_since = time.monotonic()
            logger.warning(
                "%s: Consul failed or restarted; holding %d instance(s) for up to %.0fs while they register again",
                self.service,
                len(self._instances),
                self._hold_seconds,
            )

    def _hold_left(self) -> float:
        if self._blink_since is None:
            return 0.0
        return max(0.0, self._blink_since + self._hold_seconds - time.monotonic())

    async def _end_blink(self, passing: Sequence[Instance]) -> None:
        if self._blink_since is not None:
            if self._hold_left() == 0:
                logger.warning("%s: the hold ran out; instances still missing from Consul leave", self.service)
            else:
                logger.info("%s: every held instance is back in Consul", self.service)
        self._blink_since = None
        await self._update(passing)

    async def _update(self, instances: Sequence[Instance], *, force: bool = False) -> None:
        ordered = tuple(sorted(instances, key=lambda i: i.id))
        if not force and [(i, i.meta) for i in ordered] == [(i, i.meta) for i in self._instances]:
            return  # nothing changed, meta included (Instance equality leaves meta out)
        self._instances = ordered
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
