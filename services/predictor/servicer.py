"""Thin gRPC servicer of modelgrid.predictor.v1.Predictor: protobuf in, core call, protobuf out."""

import asyncio
from collections.abc import AsyncIterator

from modelgrid.client.convert import ref_to_pb, timestamp
from modelgrid.client.errors import InvalidArgument, ModelgridError, ResourceExhausted
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from services.kit.interceptors import status_of
from services.predictor import converters as conv
from services.predictor.batch_jobs import BatchJob, BatchJobs
from services.predictor.control import ModelControl
from services.predictor.inference import Inference
from services.predictor.settings import DEFAULT_MAX_REQUEST_BYTES
from services.predictor.siblings import Siblings
from services.predictor.streams import answer_concurrently


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    """Adapts gRPC calls to Inference, ModelControl and BatchJobs."""

    def __init__(
        self,
        inference: Inference,
        control: ModelControl,
        jobs: BatchJobs,
        max_streamed_job_bytes: int,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        siblings: Siblings | None = None,
    ):
        self._siblings = siblings or Siblings()
        self._inference = inference
        self._control = control
        self._jobs = jobs
        self._max_streamed_job_bytes = max_streamed_job_bytes
        self._max_request_bytes = max_request_bytes
        self.instance = ""  # this replica's Consul id, set once the server is bound

    async def _predict(self, request: pb.PredictRequest, deadline: float | None) -> pb.PredictResponse:
        prediction = await self._inference.predict(
            conv.ref_from_pb(request.model),
            conv.inputs_from_pb(request.inputs, self._max_request_bytes),
            list(request.output_filter),
            deadline=deadline,
        )
        return pb.PredictResponse(
            model_name=prediction.model, version=prediction.version, outputs=conv.outputs_to_pb(prediction.outputs)
        )

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        """Answers with trailers x-modelgrid-replica (which replica served) and x-modelgrid-version. No custom
        header: headers sent before the answer make a call final for a client's gRPC retry policy, so a call cut by
        a dying process (of a multi-process replica) could not be retried."""
        response = await self._predict(request, conv.deadline_of(context))
        context.set_trailing_metadata(
            (("x-modelgrid-replica", self.instance), ("x-modelgrid-version", str(response.version)))
        )
        return response

    async def PredictStream(self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context):
        """Requests run concurrently (so they batch with each other); answers come back as they finish."""
        deadline = conv.deadline_of(context)

        async def answer(item: pb.PredictStreamRequest) -> pb.PredictStreamResponse:
            try:
                return pb.PredictStreamResponse(id=item.id, response=await self._predict(item.request, deadline))
            except ModelgridError as exc:
                error = pb.PredictError(code=status_of(exc).value[0], message=str(exc))
                return pb.PredictStreamResponse(id=item.id, error=error)

        async for response in answer_concurrently(request_iterator, answer):
            yield response

    async def BatchPredict(self, request_iterator: AsyncIterator[pb.BatchPredictRequest], context) -> pb.BatchJob:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("the first BatchPredict message must carry the job spec")
        spec = first.spec
        ref = conv.ref_from_pb(spec.model)
        self._control.select(ref)  # fail before receiving records
        digest = spec.input_digest
        if not digest:
            digest = await self._store_streamed_records(request_iterator)
        elif await anext(aiter(request_iterator), None) is not None:
            raise InvalidArgument("a job with an input_digest takes no records in the stream")
        else:
            await self._jobs.check_input(digest)  # NOT_FOUND now rather than a failed job later
        job = await self._jobs.submit(ref, digest, list(spec.output_filter), spec.batch_size)
        return _job_to_pb(job)

    async def _store_streamed_records(self, request_iterator: AsyncIterator[pb.BatchPredictRequest]) -> str:
        groups, received = [], 0
        async for message in request_iterator:
            if message.WhichOneof("payload") != "records":
                raise InvalidArgument("only the first BatchPredict message may carry the spec")
            received += message.ByteSize()
            if received > self._max_streamed_job_bytes:
                raise ResourceExhausted(
                    f"streamed records exceed {self._max_streamed_job_bytes} bytes "
                    "(MODELGRID_PREDICTOR_MAX_STREAMED_JOB_BYTES); upload the data set to the registry instead"
                )
            groups.append(conv.inputs_from_pb(message.records.inputs, self._max_request_bytes))
        return await self._jobs.store_records(groups)

    async def GetBatchJob(self, request: pb.GetBatchJobRequest, context) -> pb.BatchJob:
        return _job_to_pb(await self._jobs.get(request.id))

    async def ListBatchJobs(self, request: pb.ListBatchJobsRequest, context) -> pb.ListBatchJobsResponse:
        jobs, token = await self._jobs.list_jobs(request.page.page_size, request.page.page_token)
        response = pb.ListBatchJobsResponse(jobs=[_job_to_pb(j) for j in jobs])
        response.page.next_page_token = token
        return response

    async def CancelBatchJob(self, request: pb.CancelBatchJobRequest, context) -> pb.BatchJob:
        return _job_to_pb(await self._jobs.cancel(request.id))

    async def GetModelMetadata(self, request: pb.GetModelMetadataRequest, context) -> pb.ModelStatus:
        return conv.status_to_pb(self._control.status(request.name))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[conv.status_to_pb(m) for m in self._control.index()])

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelStatus:
        policy = conv.policy_from_pb(request.policy)
        status, _ = await asyncio.gather(
            self._control.load(request.name, policy, wait=request.wait),
            self._siblings.call("/modelgrid.predictor.v1.Predictor/LoadModel", request, context),
        )
        return conv.status_to_pb(status)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        method = "/modelgrid.predictor.v1.Predictor/UnloadModel"
        await asyncio.gather(self._control.unload(request.name), self._siblings.call(method, request, context))
        return pb.UnloadModelResponse()


def _job_to_pb(job: BatchJob) -> pb.BatchJob:
    message = pb.BatchJob(
        id=job.id,
        state=pb.BatchJobState.Value(f"BATCH_JOB_STATE_{job.state.value}"),
        spec=pb.BatchJobSpec(input_digest=job.input_digest, output_filter=job.output_filter, batch_size=job.batch_size),
        version=job.version,
        total_records=job.total_records,
        done_records=job.done_records,
        output_digest=job.output_digest,
        error=job.error,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        instance=job.instance,
    )
    message.spec.model.CopyFrom(ref_to_pb(job.model))
    return message
