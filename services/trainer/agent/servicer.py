"""Thin gRPC servicer of modelgrid.agent.v1.WorkerAgent: protobuf in, ReplicaSupervisor call, protobuf out. Calls
that start or stop workers pass the trainer's fence first (agent.fences)."""

from collections.abc import AsyncIterator

from modelgrid.agent.v1 import agent_pb2 as pb
from modelgrid.agent.v1 import agent_pb2_grpc
from services.clients.agent.client import checkpoint_to_pb, data_from_pb
from services.clients.agent.types import ReplicaEvent, ReplicaKey, ReplicaState, ReplicaStatus
from services.trainer.agent.fences import FenceBook
from services.trainer.agent.supervisor import ReplicaSupervisor

_STATES = {ReplicaState.RUNNING: pb.REPLICA_STATE_RUNNING, ReplicaState.EXITED: pb.REPLICA_STATE_EXITED}


PROTO_SERVICE = pb.DESCRIPTOR.services_by_name["WorkerAgent"].full_name
"""The full name of the service this servicer serves (for health and reflection)."""


class WorkerAgentServicer(agent_pb2_grpc.WorkerAgentServicer):
    """Adapts gRPC calls to the ReplicaSupervisor."""

    def __init__(self, supervisor: ReplicaSupervisor) -> None:
        self._supervisor = supervisor
        self._fences = FenceBook()

    def add_to(self, server) -> None:
        """Serves this servicer on `server`."""
        agent_pb2_grpc.add_WorkerAgentServicer_to_server(self, server)

    async def ReservePorts(self, request: pb.ReservePortsRequest, context) -> pb.ReservePortsResponse:
        self._fences.admit(request.fence)
        return pb.ReservePortsResponse(ports=self._supervisor.reserve_ports(request.job_id, request.count))

    async def ReleasePorts(self, request: pb.ReleasePortsRequest, context) -> pb.ReleasePortsResponse:
        self._fences.note(request.fence)  # only after the job's final state was stored: the store fenced that
        await self._supervisor.release_ports(request.job_id)
        return pb.ReleasePortsResponse()

    async def StartReplica(self, request: pb.StartReplicaRequest, context) -> pb.Replica:
        self._fences.admit(request.fence)
        key = ReplicaKey(request.job_id, request.attempt, request.task_index)
        data = data_from_pb(request.data) if request.HasField("data") else None
        status = await self._supervisor.start_replica(key, request.tf_config, request.worker_spec, data)
        return replica_to_pb(status)

    async def StopReplica(self, request: pb.StopReplicaRequest, context) -> pb.Replica:
        self._fences.admit(request.fence)
        key = ReplicaKey(request.job_id, request.attempt, request.task_index)
        return replica_to_pb(self._supervisor.stop_replica(key, request.kill))

    async def ListReplicas(self, request: pb.ListReplicasRequest, context) -> pb.ListReplicasResponse:
        self._fences.note(request.fence)
        replicas = self._supervisor.list_replicas(request.job_id)
        return pb.ListReplicasResponse(replicas=[replica_to_pb(r) for r in replicas])

    async def WatchReplicas(self, request: pb.WatchReplicasRequest, context) -> AsyncIterator[pb.ReplicaEvent]:
        self._fences.note(request.fence)
        async for event in self._supervisor.watch(request.job_id):
            yield event_to_pb(event)

    async def ReplicaLogs(self, request: pb.ReplicaLogsRequest, context) -> pb.ReplicaLogsResponse:
        lines = await self._supervisor.replica_logs(request.job_id, request.task_index, request.tail_lines)
        return pb.ReplicaLogsResponse(lines=lines)


def replica_to_pb(replica: ReplicaStatus) -> pb.Replica:
    message = pb.Replica(
        job_id=replica.key.job_id,
        attempt=replica.key.attempt,
        task_index=replica.key.task_index,
        state=_STATES[replica.state],
        exit_code=replica.exit_code,
        pid=replica.pid,
        agent=replica.agent,
        error=replica.error,
    )
    if replica.checkpoint is not None:
        message.checkpoint.CopyFrom(checkpoint_to_pb(replica.checkpoint))
    if replica.export is not None:
        message.export.CopyFrom(pb.Export(digest=replica.export.digest, size_bytes=replica.export.size_bytes))
    return message


def event_to_pb(event: ReplicaEvent) -> pb.ReplicaEvent:
    return pb.ReplicaEvent(replica=replica_to_pb(event.replica), progress=event.progress)
