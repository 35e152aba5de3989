"""Clients of the trainer: submit a job from its spec, follow it, read its logs, cancel it.

    with connect("127.0.0.1:8080", api_key=key) as channel:
        trainer = TrainerClient(channel)
        job = trainer.submit({"name": "digits", "recipe": "mlp", "workers": 2, ...})
        for event in trainer.watch(job.id):
            print(event.message)

A spec is a `JobSpec` message or a dict of its fields as in a job spec file (examples/*.yaml). Every submission
carries a request id (one is made when none is given), so submitting again with the same id does not start a
second job. Failed calls raise the errors of `modelgrid.client.errors`.
"""

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from modelgrid.client.calls import AsyncCalls, Calls, Metadata
from modelgrid.client.errors import InvalidArgument
from modelgrid.client.rpc_errors import rpc_errors
from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc

SERVICE = "trainer"
TIMEOUT = 30.0
"""Default deadline of every call but `watch`, in seconds."""
ALL_TASKS = -1


def job_spec(spec: pb.JobSpec | Mapping[str, Any]) -> pb.JobSpec:
    """A JobSpec message from a message or a dict of its fields (unknown fields are an error, not ignored)."""
    if isinstance(spec, pb.JobSpec):
        return spec
    try:
        return json_format.ParseDict(dict(spec), pb.JobSpec())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"not a valid job spec: {exc}") from None


def submit_request(spec: pb.JobSpec | Mapping[str, Any], request_id: str = "") -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(spec=job_spec(spec), request_id=request_id or str(uuid.uuid4()))


def logs_request(job_id: str, task: int = ALL_TASKS, tail_lines: int = 0) -> pb.GetJobLogsRequest:
    return pb.GetJobLogsRequest(id=job_id, task_index=task, tail_lines=tail_lines)


def list_request(state: int = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0, page_token: str = "") -> pb.ListJobsRequest:
    return pb.ListJobsRequest(state=state, page_size=page_size, page_token=page_token)


class TrainerClient(Calls):
    """Blocking trainer client, directly or through the gateway."""

    service = SERVICE

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = TIMEOUT, metadata: Metadata = ()) -> None:
        super().__init__(trainer_pb2_grpc.TrainerStub(channel), timeout, metadata)

    def submit(self, spec: pb.JobSpec | Mapping[str, Any], *, request_id: str = "") -> pb.Job:
        """Submits a job; returns it PENDING (or as it is, when `request_id` was used before)."""
        return self._call(self.stub.SubmitJob, submit_request(spec, request_id))

    def job(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id))

    def jobs(
        self, state: int = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0, page_token: str = ""
    ) -> pb.ListJobsResponse:
        return self._call(self.stub.ListJobs, list_request(state, page_size, page_token))

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(id=job_id))

    def logs(self, job_id: str, *, task: int = ALL_TASKS, tail_lines: int = 0) -> list[pb.WorkerLog]:
        """The last `tail_lines` (0: the trainer's default) of each worker's log, or of worker `task` only."""
        return list(self._call(self.stub.GetJobLogs, logs_request(job_id, task, tail_lines)).logs)

    def workers(self) -> pb.ListWorkersResponse:
        """The worker agents the trainer knows, their slots and what runs on them."""
        return self._call(self.stub.ListWorkers, pb.ListWorkersRequest())

    def watch(self, job_id: str, *, cursor: str = "", timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's events from the first (or after `cursor`) until it ends; `timeout` bounds the whole stream."""
        with rpc_errors(SERVICE):
            yield from self.stub.WatchJob(
                pb.WatchJobRequest(id=job_id, cursor=cursor), timeout=timeout, metadata=self.headers
            )


class AsyncTrainerClient(AsyncCalls):
    """asyncio trainer client: `TrainerClient`'s calls, awaited."""

    service = SERVICE

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float | None = TIMEOUT, metadata: Metadata = ()) -> None:
        super().__init__(trainer_pb2_grpc.TrainerStub(channel), timeout, metadata)

    async def submit(self, spec: pb.JobSpec | Mapping[str, Any], *, request_id: str = "") -> pb.Job:
        return await self._call(self.stub.SubmitJob, submit_request(spec, request_id))

    async def job(self, job_id: str) -> pb.Job:
        return await self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id))

    async def jobs(
        self, state: int = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0, page_token: str = ""
    ) -> pb.ListJobsResponse:
        return await self._call(self.stub.ListJobs, list_request(state, page_size, page_token))

    async def cancel(self, job_id: str) -> pb.Job:
        return await self._call(self.stub.CancelJob, pb.CancelJobRequest(id=job_id))

    async def logs(self, job_id: str, *, task: int = ALL_TASKS, tail_lines: int = 0) -> list[pb.WorkerLog]:
        reply = await self._call(self.stub.GetJobLogs, logs_request(job_id, task, tail_lines))
        return list(reply.logs)

    async def workers(self) -> pb.ListWorkersResponse:
        return await self._call(self.stub.ListWorkers, pb.ListWorkersRequest())

    async def watch(self, job_id: str, *, cursor: str = "", timeout: float | None = None) -> AsyncIterator[pb.JobEvent]:
        with rpc_errors(SERVICE):
            request = pb.WatchJobRequest(id=job_id, cursor=cursor)
            async for event in self.stub.WatchJob(request, timeout=timeout, metadata=self.headers):
                yield event
