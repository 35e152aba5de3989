"""One grpc.aio channel per healthy instance of a service, and the choice of an instance for each call.

The gateway (every backend), the registry client and the trainer's agent client all use this one component: it
follows the healthy set in Consul (or a fixed list of targets), opens a channel to each member as it joins, closes
it a grace period after it leaves, and picks a member per call with a pluggable picker.
"""

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from modelgrid.client.errors import Unavailable
from services.kit.consul import ConsulClient, Instance
from services.kit.discovery import ServiceResolver
from services.kit.telemetry import client_interceptors
from services.kit.tls import InternalTLS, expect

logger = logging.getLogger(__name__)

CHANNEL_DEFAULTS: tuple[tuple[str, int], ...] = (
    # gRPC's own reconnect backoff grows to two minutes: a restarted instance at the same address (a fixed target,
    # or one that registers again) would wait that long to be used again.
    ("grpc.max_reconnect_backoff_ms", 5000),
    # A host that vanishes (a cut link, a dead machine) sends nothing back: without pings a call to it waits for its
    # deadline. Ping every 2 s while calls are in flight; no answer in 2 s fails them UNAVAILABLE, retryable
    # elsewhere. Servers accept these pings (kit.server.KEEPALIVE_POLICY).
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(eq=False)
class Member:
    """One instance in the pool: its channel, the calls in flight on it, and until when it is ejected."""

    instance: Instance
    channel: grpc.aio.Channel
    in_flight: int = 0
    ejected_until: float = 0.0  # time.monotonic()
    ejected_at_wall: float = 0.0  # the same moment on the wall clock, for people
    closed: bool = False  # its channel was closed after it left the healthy set

    @property
    def target(self) -> str:
        return self.instance.target

    @contextmanager
    def track(self) -> Iterator["Member"]:
        """Counts one call in flight on this member for the duration of the block."""
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1


Picker = Callable[[Sequence[Member]], Member]


def round_robin() -> Picker:
    """Members in turn."""
    turn = itertools.count()
    return lambda members: members[next(turn) % len(members)]


def fewest_in_flight() -> Picker:
    """The member with the fewest calls in flight; ties at random."""

    def pick(members: Sequence[Member]) -> Member:
        fewest = min(m.in_flight for m in members)
        return random.choice([m for m in members if m.in_flight == fewest])

    return pick


class InstancePool:
    """The healthy instances of one service with a channel each.

    With `targets`, the pool is that fixed list (no Consul): e.g. a registry address given in the settings.
    With `tls` (kit.tls), every channel is mTLS and each instance must present a certificate for `service`.
    `hold_seconds` is how long the members stay when Consul fails or restarts empty (see ServiceResolver).
    """

    def __init__(
        self,
        consul: ConsulClient | None,
        service: str,
        *,
        targets: Sequence[str] = (),
        picker: Picker | None = None,
        options: Sequence[tuple[str, object]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        tls: InternalTLS | None = None,
        close_grace: float = 30.0,
        hold_seconds: float = 60.0,
    ) -> None:
        if consul is None and not targets:
            raise ValueError(f"{service}: an InstancePool needs Consul or fixed targets")
        self.service = service
        self._resolver = (
            ServiceResolver(consul, service, hold_seconds=hold_seconds) if consul is not None and not targets else None
        )
        self._targets = list(targets)
        self._picker = picker or round_robin()
        given = {name for name, _ in options}
        self._options = [*options, *((name, value) for name, value in CHANNEL_DEFAULTS if name not in given)]
        self._interceptors = list(client_interceptors() if interceptors is None else interceptors)
        self._tls = tls
        self._close_grace = close_grace
        self._members: dict[str, Member] = {}  # healthy, by instance id
        self._seen: dict[str, Member] = {}  # every member ever healthy, by instance id
        self._listeners: list[Callable[[], None]] = []
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()

    @property
    def members(self) -> dict[str, Member]:
        """The healthy members by instance id."""
        return self._members

    @property
    def instances(self) -> tuple[Instance, ...]:
        """The healthy instances."""
        return tuple(m.instance for m in self._members.values())

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every change of the healthy set (tags and meta included)."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Takes the first answer from Consul (or the fixed targets), then follows changes."""
        if self._resolver is None:
            self._sync([_fixed_instance(self.service, target) for target in self._targets])
            return
        self._resolver.add_listener(self._on_resolved)
        await self._resolver.start()

    def pick(self, *, tag: str = "", exclude: Sequence[str] = ()) -> Member:
        """A member for one call: among those not excluded (by target), preferring ones that carry `tag`, leaving
        out ejected ones unless nothing else is left. Unavailable when there is none."""
        candidates = list(self._members.values())
        if exclude:
            candidates = [m for m in candidates if m.target not in exclude]
        if tag:
            candidates = [m for m in candidates if tag in m.instance.tags] or candidates
        now = time.monotonic()
        in_rotation = [m for m in candidates if m.ejected_until <= now]
        pool = in_rotation or candidates
        if not pool:
            raise Unavailable(f"no healthy instance of {self.service}")
        return self._picker(pool)

    def channel(self) -> grpc.aio.Channel:
        """A channel to one healthy member (picked per call)."""
        return self.pick().channel

    def channel_for(self, instance_id: str) -> grpc.aio.Channel:
        """The channel of a healthy member, or of one that was healthy before (work on an instance Consul just
        marked critical must still be stoppable). Unavailable for an instance never seen."""
        member = self._members.get(instance_id) or self._seen.get(instance_id)
        if member is None:
            raise Unavailable(f"{self.service} instance {instance_id} is not healthy in Consul")
        if member.closed:
            member.channel, member.closed = self._open(member.target), False
            self._close_later(member)
        return member.channel

    def eject(self, member: Member, seconds: float) -> None:
        """Takes a member out of rotation for `seconds` (it is still picked when nothing else is left)."""
        member.ejected_until = time.monotonic() + seconds
        member.ejected_at_wall = time.time() + seconds
        logger.warning("%s: ejected %s for %.0fs", self.service, member.target, seconds)

    async def wait_for(self, predicate: Callable[[dict[str, Member]], bool], timeout: float) -> dict[str, Member]:
        """Waits until predicate(members) holds; TimeoutError after `timeout` seconds."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self._members)), timeout)
            return self._members

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._tls is not None:  # mTLS, and the instance must prove it is this service whatever its address
            options = [*self._options, *expect(self.service)]
            credentials = self._tls.channel_credentials()
            return grpc.aio.secure_channel(target, credentials, options=options, interceptors=self._interceptors)
        return grpc.aio.insecure_channel(target, options=self._options, interceptors=self._interceptors)

    def _on_resolved(self, instances: Sequence[Instance]) -> None:
        self._sync(instances)

    def _sync(self, instances: Sequence[Instance]) -> None:
        alive = {i.id: i for i in instances}
        for instance_id in [i for i in self._members if i not in alive]:
            gone = self._members.pop(instance_id)
            logger.info("%s: %s left", self.service, gone.target)
            self._close_later(gone)
        for instance_id, instance in alive.items():
            member = self._members.get(instance_id)
            if member is not None and member.target == instance.target:
                member.instance = instance  # tags and meta may have changed
                continue
            if member is not None:  # same id, new address
                self._close_later(member)
            previous = self._seen.get(instance_id)
            if previous is not None and previous.target == instance.target and not previous.closed:
                previous.instance = instance  # back before its channel was closed
                member = previous
            else:
                member = Member(instance, self._open(instance.target))
                logger.info("%s: %s joined", self.service, instance.target)
            self._members[instance_id] = member
            self._seen[instance_id] = member
        for listener in self._listeners:
            listener()
        self._spawn(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _close_later(self, member: Member) -> None:
        """Closes a departed member's channel after the grace period (calls on it may finish), unless it is back."""

        async def close() -> None:
            await asyncio.sleep(self._close_grace)
            if self._members.get(member.instance.id) is not member and not member.closed:
                member.closed = True
                await member.channel.close()

        self._spawn(close())

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stops following Consul and closes every channel."""
        if self._resolver is not None:
            await self._resolver.stop()
        for task in list(self._tasks):
            task.cancel()
        channels = {id(m.channel): m.channel for m in [*self._seen.values(), *self._members.values()]}
        self._members, self._seen = {}, {}
        await asyncio.gather(*(c.close() for c in channels.values()), return_exceptions=True)


def _fixed_instance(service: str, target: str) -> Instance:
    host, _, port = target.rpartition(":")
    return Instance(id=target, service=service, address=host, port=int(port))
