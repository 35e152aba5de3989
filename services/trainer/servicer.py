"""Thin gRPC servicer of modelgrid.trainer.v1.Trainer: protobuf in, core call, protobuf out."""

from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.kit.watch_limits import WatchLimits
from services.trainer import converters as conv
from services.trainer.core import TrainerCore

PROTO_SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"].full_name
"""The full name of the service this servicer serves (for health and reflection)."""


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """Adapts gRPC calls to TrainerCore."""

    def __init__(self, core: TrainerCore, watches: WatchLimits) -> None:
        self._core = core
        self._watches = watches

    def add_to(self, server) -> None:
        """Serves this servicer on `server`."""
        trainer_pb2_grpc.add_TrainerServicer_to_server(self, server)

    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.Job:
        return conv.job_to_pb(await self._core.submit(conv.spec_from_pb(request.spec), request.request_id))

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return conv.job_to_pb(await self._core.get(request.id))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs, token = await self._core.list_jobs(
            conv.state_from_pb(request.state), request.page_size, request.page_token
        )
        return pb.ListJobsResponse(jobs=[conv.job_to_pb(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return conv.job_to_pb(await self._core.cancel(request.id))

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        with self._watches.hold(context):
            async for event in self._core.watch(request.id, request.cursor):
                yield conv.event_to_pb(event)

    async def GetJobLogs(self, request: pb.GetJobLogsRequest, context) -> pb.GetJobLogsResponse:
        logs = await self._core.logs(request.id, request.task_index, request.tail_lines)
        return pb.GetJobLogsResponse(logs=[pb.WorkerLog(task_index=t, agent=a, lines=lines) for t, a, lines in logs])

    async def ListWorkers(self, request: pb.ListWorkersRequest, context) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(workers=[conv.worker_to_pb(w) for w in await self._core.worker_views()])
