"""Agents fence the trainer's calls: the newest epoch of each leader lock, kept by the agent (FenceBook), refuses an
older leader's calls that start or stop workers; the other calls teach a newer epoch and are never refused. First the
book on its own, then a real agent (in this process, in the session's Consul) called over gRPC."""

import asyncio
import time

import pytest

from modelgrid.agent.v1 import agent_pb2 as pb
from modelgrid.client.errors import Aborted, InvalidArgument
from services.clients.agent import AgentClient
from services.clients.agent.types import ReplicaKey
from services.kit.leader import Fence, FencedOut
from services.trainer.agent.fences import FenceBook

LOCK = "modelgrid/trainer/leader"


def _fence(epoch: int, lock: str = LOCK) -> pb.LeaderFence:
    return pb.LeaderFence(lock=lock, epoch=epoch)


def test_an_older_epoch_is_refused_and_a_newer_one_becomes_the_newest():
    book = FenceBook()
    book.admit(_fence(7))
    book.admit(_fence(7))  # the same leader again
    with pytest.raises(Aborted, match="epoch 7 of modelgrid/trainer/leader, this call's is 6"):
        book.admit(_fence(6))
    book.admit(_fence(9))
    assert book.newest(LOCK) == 9
    with pytest.raises(Aborted):
        book.admit(_fence(7))


def test_reads_teach_a_newer_epoch_and_are_never_refused():
    book = FenceBook()
    book.note(_fence(5))
    book.note(_fence(3))  # an old leader's read goes through, and lowers nothing
    assert book.newest(LOCK) == 5
    with pytest.raises(Aborted):
        book.admit(_fence(4))


def test_locks_are_apart_and_an_unset_fence_is_not_fenced():
    book = FenceBook()
    book.admit(_fence(50))
    book.admit(_fence(2, lock="modelgrid/trainer/other"))  # another trainer group's leader
    book.admit(pb.LeaderFence())  # a caller that elects no leader
    assert (book.newest(LOCK), book.newest("modelgrid/trainer/other"), book.newest("")) == (50, 2, 0)


def test_a_lock_name_past_the_bound_is_invalid():
    with pytest.raises(InvalidArgument, match="longer than 512"):
        FenceBook().note(_fence(1, lock="k" * 513))


def test_the_book_forgets_the_lock_seen_least_recently_beyond_its_bound():
    book = FenceBook(max_locks=2)
    book.admit(_fence(10, lock="a"))
    book.admit(_fence(10, lock="b"))
    book.note(_fence(10, lock="a"))  # "a" is now the most recent
    book.admit(_fence(10, lock="c"))
    assert (book.newest("a"), book.newest("b"), book.newest("c")) == (10, 0, 10)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_real_agent_refuses_a_deposed_leaders_calls_that_act_on_workers(agents, agent_client: AgentClient):
    await agents(slots=2)
    deadline = time.monotonic() + 20
    while len(agent_client.agents) != 1:
        assert time.monotonic() < deadline, "the agent never became healthy in Consul"
        await asyncio.sleep(0.05)
    (agent_id,) = agent_client.agents
    old = agent_client.fenced(Fence(LOCK, 100))
    new = agent_client.fenced(Fence(LOCK, 200))

    ports = await old.reserve_ports(agent_id, "job-a", 1)
    assert await new.list_replicas(agent_id, "job-a") == []  # the new leader re-attaches: the agent hears epoch 200

    with pytest.raises(FencedOut, match="epoch 200"):
        await old.reserve_ports(agent_id, "job-b", 1)
    with pytest.raises(FencedOut):
        await old.stop_replica(agent_id, ReplicaKey("job-a", 1, 0), kill=True)
    assert await old.list_replicas(agent_id) == []  # reads go through

    assert await new.reserve_ports(agent_id, "job-a", 1) == ports  # the reservation the old leader made stands
    await old.release_ports(agent_id, "job-a")  # never refused: it comes after the job's final state was stored
    other_group = agent_client.fenced(Fence("modelgrid/trainer/elsewhere", 1))
    assert len(await other_group.reserve_ports(agent_id, "job-c", 1)) == 1
    assert len(await agent_client.reserve_ports(agent_id, "job-d", 1)) == 1  # unfenced
