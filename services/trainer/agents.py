"""The worker agents the trainer can use: healthy `trainer-agent` instances from Consul, with a gRPC stub each."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.kit.consul import Instance
from services.kit.discovery import ServiceResolver
from services.kit.errors import Unavailable
from services.kit.telemetry import client_interceptors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Agent:
    """A healthy worker agent."""

    id: str
    address: str  # gRPC endpoint
    host: str  # its advertised address: where its workers' collective ports are reachable
    slots: int


class AgentDirectory:
    """Healthy agents as Consul reports them, and channels to them."""

    def __init__(self, resolver: ServiceResolver) -> None:
        self._resolver = resolver
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._seen: dict[str, Agent] = {}  # every agent ever healthy, to reach one Consul just marked critical
        self._listeners: list[Callable[[], None]] = []
        resolver.add_listener(self._on_change)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called after every change of the healthy set."""
        self._listeners.append(listener)

    @property
    def agents(self) -> dict[str, Agent]:
        return {i.id: _agent(i) for i in self._resolver.instances}

    def stub(self, agent_id: str, *, healthy_only: bool = True) -> trainer_pb2_grpc.WorkerAgentStub:
        """A stub for an agent. Work is only given to healthy agents; stopping, listing and releasing also reach
        one whose check just failed (a busy agent that still runs workers must still be told to stop them)."""
        agent = self.agents.get(agent_id) or (None if healthy_only else self._seen.get(agent_id))
        if agent is None:
            raise Unavailable(f"worker agent {agent_id} is not healthy in Consul")
        channel = self._channels.get(agent.address)
        if channel is None:
            channel = grpc.aio.insecure_channel(agent.address, interceptors=client_interceptors())
            self._channels[agent.address] = channel
        return trainer_pb2_grpc.WorkerAgentStub(channel)

    def _on_change(self, instances: Sequence[Instance]) -> None:
        self._seen.update({i.id: _agent(i) for i in instances})
        for listener in self._listeners:
            listener()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _agent(instance: Instance) -> Agent:
    slots = instance.meta.get("slots", "1")
    return Agent(
        id=instance.id,
        address=instance.target,
        host=instance.address,
        slots=int(slots) if slots.isdigit() else 1,
    )


def place(workers: int, free: dict[str, int]) -> list[str] | None:
    """Agents for `workers` replicas, spread: each replica goes to the agent with the most free slots left (ties
    by id). None when they do not all fit (gang scheduling: all or nothing)."""
    if sum(free.values()) < workers:
        return None
    left = dict(free)
    chosen = []
    for _ in range(workers):
        agent = min(left, key=lambda a: (-left[a], a))
        if left[agent] <= 0:
            return None
        chosen.append(agent)
        left[agent] -= 1
    return chosen
