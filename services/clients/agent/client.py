"""asyncio client of the trainer's worker agents (`trainer-agent` in Consul, modelgrid.agent.v1.WorkerAgent).

Every call names the agent it is for. Work is only given to healthy agents (`reserve_ports`, `start_replica`,
`replica_logs`); stopping, listing, watching and releasing also reach an agent that was healthy before, since a
busy agent whose check just failed may still run workers that must be stopped. Replies are the types of
services.clients.agent.types; failures are the kit's domain errors, never gRPC errors.

A leading trainer calls through `fenced(fence)`: every call but ReplicaLogs carries its fencing token, and an
agent that has seen a newer leader refuses the calls that start or stop workers (reserve_ports, start_replica,
stop_replica), raised here as FencedOut.
"""

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from modelgrid.agent.v1 import agent_pb2 as pb
from modelgrid.agent.v1 import agent_pb2_grpc
from modelgrid.client.errors import Aborted, Unavailable
from modelgrid.client.rpc_errors import rpc_errors
from services.clients.agent.types import (
    Checkpoint,
    Export,
    ReplicaData,
    ReplicaEvent,
    ReplicaKey,
    ReplicaState,
    ReplicaStatus,
)
from services.clients.agent.worker_spec import WorkerSpec
from services.kit.channels import InstancePool
from services.kit.consul import Instance
from services.kit.leader import Fence, FencedOut

SERVICE = "trainer-agent"
TIMEOUT = 10.0  # seconds, for every call but StartReplica
START_TIMEOUT = 30.0

_STATES = {pb.REPLICA_STATE_RUNNING: ReplicaState.RUNNING, pb.REPLICA_STATE_EXITED: ReplicaState.EXITED}


@dataclass(frozen=True)
class Agent:
    """A healthy worker agent."""

    id: str
    address: str
    """Its gRPC endpoint."""
    host: str
    """Its advertised address: where its workers' collective ports are reachable."""
    slots: int
    """Worker processes it runs at once."""


class AgentClient:
    """Calls to the worker agents of one InstancePool (unfenced, or with one leader's fence)."""

    def __init__(self, pool: InstancePool, fence: Fence | None = None) -> None:
        self._pool = pool
        self._fence = pb.LeaderFence(lock=fence.lock, epoch=fence.epoch) if fence is not None else None

    def fenced(self, fence: Fence) -> "AgentClient":
        """A client over the same agents whose calls carry `fence`."""
        return AgentClient(self._pool, fence)

    @contextlib.contextmanager
    def _acting(self, agent_id: str) -> Iterator[None]:
        """Around a call that starts or stops workers: domain errors for gRPC ones, and the agent's ABORTED to a
        fenced call is FencedOut (the other calls are never refused for their fence)."""
        try:
            with rpc_errors(SERVICE):
                yield
        except Aborted as exc:
            if self._fence is None:
                raise
            raise FencedOut(f"worker agent {agent_id} refused a call: {exc}") from exc

    @property
    def agents(self) -> dict[str, Agent]:
        """The healthy agents by id."""
        return {agent_id: _agent(member.instance) for agent_id, member in self._pool.members.items()}

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every change of the healthy agents."""
        self._pool.add_listener(listener)

    def _stub(self, agent_id: str, *, healthy_only: bool) -> agent_pb2_grpc.WorkerAgentStub:
        if healthy_only:
            member = self._pool.members.get(agent_id)
            if member is None:
                raise Unavailable(f"worker agent {agent_id} is not healthy in Consul")
            return agent_pb2_grpc.WorkerAgentStub(member.channel)
        return agent_pb2_grpc.WorkerAgentStub(self._pool.channel_for(agent_id))

    async def reserve_ports(self, agent_id: str, job_id: str, count: int) -> list[int]:
        """`count` ports on the agent's host for the job: the same ones on every call."""
        stub = self._stub(agent_id, healthy_only=True)
        request = pb.ReservePortsRequest(job_id=job_id, count=count, fence=self._fence)
        with self._acting(agent_id):
            reply = await stub.ReservePorts(request, timeout=TIMEOUT)
        return list(reply.ports)

    async def release_ports(self, agent_id: str, job_id: str) -> None:
        """Frees the job's ports on the agent (and its exited replicas there)."""
        stub = self._stub(agent_id, healthy_only=False)
        with rpc_errors(SERVICE):
            await stub.ReleasePorts(pb.ReleasePortsRequest(job_id=job_id, fence=self._fence), timeout=TIMEOUT)

    async def start_replica(
        self, agent_id: str, key: ReplicaKey, tf_config: str, spec: WorkerSpec, data: ReplicaData | None = None
    ) -> ReplicaStatus:
        """Starts the worker process of `key` with TF_CONFIG `tf_config` (JSON) and `spec`, or returns the one
        started before; ResourceExhausted when all the agent's slots are taken. With `data` (a trainer job's
        replica), `spec` names no path: the agent fetches the data from the registry into its own directories
        first, and sets the spec's paths to them."""
        request = pb.StartReplicaRequest(
            job_id=key.job_id,
            attempt=key.attempt,
            task_index=key.task_index,
            tf_config=tf_config,
            worker_spec=spec.to_json(),
            fence=self._fence,
        )
        if data is not None:
            request.data.CopyFrom(data_to_pb(data))
        stub = self._stub(agent_id, healthy_only=True)
        with self._acting(agent_id):
            reply = await stub.StartReplica(request, timeout=START_TIMEOUT)
        return replica_from_pb(reply)

    async def stop_replica(self, agent_id: str, key: ReplicaKey, *, kill: bool) -> ReplicaStatus:
        """SIGTERM (a preemption) or SIGKILL (`kill`) to the worker process of `key`."""
        request = pb.StopReplicaRequest(
            job_id=key.job_id, attempt=key.attempt, task_index=key.task_index, kill=kill, fence=self._fence
        )
        stub = self._stub(agent_id, healthy_only=False)
        with self._acting(agent_id):
            reply = await stub.StopReplica(request, timeout=TIMEOUT)
        return replica_from_pb(reply)

    async def list_replicas(self, agent_id: str, job_id: str = "") -> list[ReplicaStatus]:
        """The worker processes the agent knows (of one job when given), running or exited."""
        stub = self._stub(agent_id, healthy_only=False)
        with rpc_errors(SERVICE):
            reply = await stub.ListReplicas(pb.ListReplicasRequest(job_id=job_id, fence=self._fence), timeout=TIMEOUT)
        return [replica_from_pb(r) for r in reply.replicas]

    async def watch_replicas(self, agent_id: str, job_id: str = "") -> AsyncIterator[ReplicaEvent]:
        """The current state of each replica, then every progress line and exit as it happens. Ends with a domain
        error when the stream breaks (the caller reconnects)."""
        stub = self._stub(agent_id, healthy_only=False)
        call = stub.WatchReplicas(pb.WatchReplicasRequest(job_id=job_id, fence=self._fence))
        try:
            with rpc_errors(SERVICE):
                async for event in call:
                    yield ReplicaEvent(replica_from_pb(event.replica), event.progress)
        finally:
            call.cancel()

    async def replica_logs(self, agent_id: str, job_id: str, task_index: int, tail_lines: int) -> list[str]:
        """The last lines the task's worker process of the job's latest attempt on the agent wrote."""
        request = pb.ReplicaLogsRequest(job_id=job_id, task_index=task_index, tail_lines=tail_lines)
        stub = self._stub(agent_id, healthy_only=True)
        with rpc_errors(SERVICE):
            reply = await stub.ReplicaLogs(request, timeout=TIMEOUT)
        return list(reply.lines)


def replica_from_pb(replica: pb.Replica) -> ReplicaStatus:
    return ReplicaStatus(
        key=ReplicaKey(replica.job_id, replica.attempt, replica.task_index),
        state=_STATES.get(replica.state, ReplicaState.RUNNING),
        pid=replica.pid,
        exit_code=replica.exit_code,
        agent=replica.agent,
        checkpoint=checkpoint_from_pb(replica.checkpoint) if replica.HasField("checkpoint") else None,
        export=Export(replica.export.digest, replica.export.size_bytes) if replica.HasField("export") else None,
        error=replica.error,
    )


def checkpoint_to_pb(checkpoint: Checkpoint) -> pb.Checkpoint:
    return pb.Checkpoint(digest=checkpoint.digest, step=checkpoint.step, size_bytes=checkpoint.size_bytes)


def checkpoint_from_pb(message: pb.Checkpoint) -> Checkpoint:
    return Checkpoint(message.digest, message.step, message.size_bytes)


def data_to_pb(data: ReplicaData) -> pb.ReplicaData:
    message = pb.ReplicaData(dataset_digest=data.dataset_digest)
    if data.restore is not None:
        message.restore.CopyFrom(checkpoint_to_pb(data.restore))
    return message


def data_from_pb(message: pb.ReplicaData) -> ReplicaData:
    restore = checkpoint_from_pb(message.restore) if message.HasField("restore") else None
    return ReplicaData(message.dataset_digest, restore)


def _agent(instance: Instance) -> Agent:
    slots = instance.meta.get("slots", "1")
    return Agent(
        id=instance.id,
        address=instance.target,
        host=instance.address,
        slots=int(slots) if slots.isdigit() else 1,
    )
