"""Leader election through a real Consul agent (kit.leader): one leads at a time, a standby takes over when the
leader stops, resigns or loses its session, and every term's epoch is larger than the last."""

import asyncio
import contextlib
import time
import uuid

import pytest

from services.kit.consul import ConsulClient
from services.kit.leader import LeaderElection


class Candidate:
    """An election and what it was told."""

    def __init__(self, consul_url: str, token: str, key: str, name: str) -> None:
        self.client = ConsulClient(consul_url, token=token)
        self.terms: list[int] = []
        self.deposed = 0
        self.election = LeaderElection(
            self.client,
            key,
            holder=name,
            checks=["serfHealth"],
            ttl_seconds=10,
            lock_delay_seconds=0,
            on_elected=self._elected,
            on_deposed=self._deposed,
        )

    async def _elected(self, epoch: int) -> None:
        self.terms.append(epoch)

    async def _deposed(self) -> None:
        self.deposed += 1

    async def close(self) -> None:
        await self.election.stop()
        await self.client.close()


async def wait_until(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def two_candidates(consul):
    """a and b campaigning (once started) for one new key with the trainer's token: its ACL rules must allow it."""
    key = f"modelgrid/trainer/test-{uuid.uuid4().hex[:8]}"
    token = consul.token_for("trainer")
    a, b = (Candidate(consul.http_url, token, key, name) for name in ("a", "b"))
    try:
        yield a, b, key
    finally:
        for candidate in (a, b):
            await candidate.close()


async def test_one_leads_and_a_standby_takes_over_when_it_stops(consul):
    async with two_candidates(consul) as (a, b, _):
        a.election.start()
        await wait_until(lambda: a.election.leading, 10, "a leading")
        b.election.start()
        await wait_until(lambda: b.election.settled.is_set(), 10, "b seeing a lead")
        assert not b.election.leading and b.terms == []
        await a.election.stop()  # hands over: its session ends and releases the lock at once
        took = await wait_until(lambda: b.election.leading, 5, "b taking over")
        assert a.deposed == 1 and not a.election.leading
        assert b.terms[0] > a.terms[0], "a new term's fencing epoch must be larger"
        assert took < 5


async def test_a_leader_that_resigns_campaigns_again_behind_the_other(consul):
    async with two_candidates(consul) as (a, b, _):
        a.election.start()
        await wait_until(lambda: a.election.leading, 10, "a leading")
        b.election.start()
        await wait_until(lambda: b.election.settled.is_set(), 10, "b seeing a lead")
        a.election.resign()  # as the trainer does when a write was refused as fenced out
        await wait_until(lambda: b.election.leading, 10, "b taking over")
        assert a.deposed == 1
        await asyncio.sleep(0.5)
        assert not a.election.leading, "only one leads"
        assert len(b.terms) == 1 and b.terms[0] > a.terms[0]


async def test_a_leader_whose_session_consul_ends_steps_down(consul):
    async with two_candidates(consul) as (a, b, key):
        a.election.start()
        await wait_until(lambda: a.election.leading, 10, "a leading")
        b.election.start()
        await wait_until(lambda: b.election.settled.is_set(), 10, "b seeing a lead")
        master = ConsulClient(consul.http_url, token=consul.master_token)
        try:
            _, entry = await master.read_key(key)
            await master.destroy_session(entry["Session"])  # what Consul does when a's node or check fails
        finally:
            await master.close()
        await wait_until(lambda: b.election.leading and a.deposed == 1, 10, "b leading, a deposed")
        assert not a.election.leading


async def test_a_token_without_the_right_never_leads_and_keeps_trying(consul):
    key = f"modelgrid/trainer/test-{uuid.uuid4().hex[:8]}"
    c = Candidate(consul.http_url, consul.token_for("registry"), key, "c")  # may not create sessions
    try:
        c.election.start()
        await asyncio.sleep(1.5)
        assert not c.election.leading and c.terms == []
        assert not c.election._task.done(), "the election keeps trying (Consul's ACLs may be fixed)"
    finally:
        await c.close()


def test_a_ttl_consul_refuses_is_refused_here():
    with pytest.raises(ValueError, match="at least 10s"):
        LeaderElection(
            None, "k", holder="h", checks=[], ttl_seconds=5, lock_delay_seconds=0,
            on_elected=None, on_deposed=None,
        )  # fmt: skip
