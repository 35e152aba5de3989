"""Leader election through Consul, with fencing tokens: Consul's own leader-election recipe.

Every candidate holds a Consul session tied to its node's health ("serfHealth") and to its own service check, with a
TTL it renews. One holds the lock on a KV key; the others block on that key and try again when it is released. A
session ends, and its lock with it, when its host dies, its process stops answering its health check, its TTL runs
out, or its holder stops (it destroys the session: the hand-over is immediate).

The leader's fencing token (`epoch`) is the key's ModifyIndex right after it took the lock: a Raft index, so every
new term has a larger one. The leader puts it on every write it makes to shared state, and the state refuses a write
whose epoch is below the newest it has seen (see trainer.store and the trainer's worker agents), so a leader cut
off from Consul cannot act after another took over, even before it notices.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from services.kit.consul import ConsulClient
from services.kit.streams import Backoff

logger = logging.getLogger(__name__)

MIN_TTL_SECONDS = 10.0
"""Consul refuses session TTLs below 10 s."""


@dataclass(frozen=True)
class Fence:
    """A leader's fencing token: the lock it leads by (a Consul KV key) and its epoch on that lock."""

    lock: str
    epoch: int


class FencedOut(Exception):
    """A write or an action was refused: a newer leader holds the lock now. Not a ModelgridError on purpose: no
    handler of ordinary failures may swallow it; the refused leader steps down."""


class LeaderElection:
    """Campaigns for `key` for as long as it is started: `on_elected(epoch)` when this instance becomes the leader,
    `on_deposed()` when it stops being one (session lost, lock taken away, `resign()`, `stop()`)."""

    def __init__(
        self,
        consul: ConsulClient,
        key: str,
        *,
        holder: str,
        checks: list[str],
        ttl_seconds: float,
        lock_delay_seconds: float,
        on_elected: Callable[[int], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
    ) -> None:
        if ttl_seconds < MIN_TTL_SECONDS:
            raise ValueError(f"a Consul session TTL is at least {MIN_TTL_SECONDS:.0f}s, not {ttl_seconds}")
        self._consul = consul
        self._key = key
        self._holder = holder
        self._checks = checks
        self._ttl = ttl_seconds
        self._lock_delay = lock_delay_seconds
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._resigned = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session = ""
        self.leading = False
        self.epoch = 0
        self.held_elsewhere = False
        """Whether another instance held the lock when this standby last looked."""
        self.settled = asyncio.Event()
        """Set once this instance led, or saw another hold the lock: there is a leader."""

    @property
    def _wait(self) -> str:
        """How long one blocking read of the key waits: a third of the TTL, so the session is renewed in time."""
        return f"{max(1, int(self._ttl / 3))}s"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"election-{self._key}")

    def resign(self) -> None:
        """Gives up the current term (e.g. a write was refused as fenced out); campaigns again afterwards."""
        self._resigned.set()

    async def stop(self) -> None:
        """Stops campaigning; a leader steps down and releases the lock at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=3.0)  # at start, until Consul ran our first health check
        while True:
            self._resigned.clear()
            try:
                name = f"leader {self._key}: {self._holder}"
                self._session = await self._consul.create_session(
                    name, ttl_seconds=self._ttl, checks=self._checks, lock_delay_seconds=self._lock_delay
                )
            except (httpx.HTTPError, KeyError, ValueError) as exc:  # also: our own check not passing yet
                delay = backoff.next()
                logger.info("leader election %s: no session yet (%s); again in %.1fs", self._key, exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            led = False
            try:
                led = await self._campaign()
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                logger.warning("leader election %s: Consul failed (%s); campaigning again", self._key, exc)
                await asyncio.sleep(backoff.next())
            finally:  # also when stop() cancels the task: it waits for the hand-over
                await self._end_term()
            if led:  # the others go first: a deposed leader that took the lock back at once would flap
                await asyncio.sleep(self._ttl / 3)

    async def _end_term(self) -> None:
        """Steps down if leading, then ends the session (which releases the lock if Consul still had it), the latter
        also when a second cancel interrupts the former."""
        try:
            if self.leading:
                self.leading = False
                logger.warning("leader election %s: %s steps down (epoch %d)", self._key, self._holder, self.epoch)
                try:
                    await self._on_deposed()
                except Exception:  # noqa: BLE001 - stepping down must go on to release the lock
                    logger.exception("leader election %s: stepping down failed", self._key)
        finally:
            if self._session:
                session, self._session = self._session, ""
                with contextlib.suppress(httpx.HTTPError):
                    await self._consul.destroy_session(session)

    async def _campaign(self) -> bool:
        """As a standby: tries the lock whenever it is free. Returns when the session is gone (False), or after a
        term (True)."""
        index = 0
        while True:
            if await self._consul.acquire(self._key, self._session, self._holder.encode()):
                _, entry = await self._consul.read_key(self._key)
                if entry is not None and entry.get("Session") == self._session:
                    self.held_elsewhere = False
                    await self._lead(int(entry["ModifyIndex"]))
                    return True
            index, entry = await self._consul.read_key(self._key)
            self.held_elsewhere = entry is not None and bool(entry.get("Session"))
            if self.held_elsewhere:
                self.settled.set()  # another instance leads
            if entry is not None and not entry.get("Session"):
                await asyncio.sleep(min(1.0, max(self._lock_delay, 0.2)))  # free but in its lock-delay: soon
            else:
                index, _ = await self._consul.read_key(self._key, index=index, wait=self._wait)
            if not await self._consul.renew_session(self._session):
                return False

    async def _lead(self, epoch: int) -> None:
        """One term: a heartbeat renews the session from the first moment; the term ends when the lock is taken
        away, the session is lost, or the leader resigns."""
        self.leading, self.epoch = True, epoch
        self._resigned.clear()  # a resign meant for an earlier term does not end this one
        logger.info("leader election %s: %s leads (epoch %d)", self._key, self._holder, epoch)
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(lost))
        try:
            try:
                await self._on_elected(epoch)
            except Exception:  # noqa: BLE001 - e.g. fenced out at once: a newer leader exists
                logger.exception("leader election %s: taking the lead failed; stepping down", self._key)
                return
            self.settled.set()
            index = 0
            while not (self._resigned.is_set() or lost.is_set()):
                read = asyncio.ensure_future(self._consul.read_key(self._key, index=index, wait=self._wait))
                ended = [asyncio.ensure_future(self._resigned.wait()), asyncio.ensure_future(lost.wait())]
                try:
                    await asyncio.wait({read, *ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (read, *ended):
                        if not task.done():
                            task.cancel()
                if not read.done() or read.cancelled():
                    continue
                try:
                    index, entry = read.result()
                except httpx.HTTPError:  # the heartbeat decides whether the session may be gone
                    await asyncio.sleep(1.0)
                    continue
                if entry is None or entry.get("Session") != self._session:
                    logger.warning("leader election %s: the lock was taken away", self._key)
                    return
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _heartbeat(self, lost: asyncio.Event) -> None:
        """Renews the session every third of the TTL for the whole term. Sets `lost` when Consul ended it, or when
        no renewal went through for two thirds of the TTL: Consul keeps a session at least a TTL after its last
        renewal, so a leader that cannot renew steps down before anyone else can take the lock."""
        renewed = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(self._ttl / 3):
                    alive = await self._consul.renew_session(self._session)
                if not alive:
                    logger.warning("leader election %s: Consul ended the session", self._key)
                    lost.set()
                    return
                renewed = time.monotonic()
            except (httpx.HTTPError, TimeoutError) as exc:
                if time.monotonic() - renewed > self._ttl * 2 / 3:
                    logger.warning("leader election %s: no renewal for %.0fs (%s)", self._key, self._ttl * 2 / 3, exc)
                    lost.set()
                    return
            await asyncio.sleep(self._ttl / 3)
