"""Clients of the predictor's own API, numpy in and out: `PredictorClient` / `AsyncPredictorClient` (a model reference
such as "mnist", "mnist@production" or "mnist:3"; batch jobs). modelgrid.client.oip has the Open Inference
Protocol's clients.

    with connect("127.0.0.1:8080", api_key=key) as channel:
        predictor = PredictorClient(channel)
        answer = predictor.predict("digits@production", {"pixels": np.zeros((1, 64), np.float32)})
        print(answer.version, answer.outputs["probabilities"].argmax(axis=1))

Failed calls raise the errors of `modelgrid.client.errors` (NotFound, InvalidArgument, ResourceExhausted, ...),
with the server's message.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import numpy as np

from modelgrid.client.calls import AsyncCalls, Calls, Metadata
from modelgrid.client.convert import ref_to_pb
from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import ModelRef
from modelgrid.client.tensors import array_to_tensor, element_type_of, tensor_to_array
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc

SERVICE = "predictor"
TIMEOUT = 30.0
"""Default deadline of every call, in seconds."""
Inputs = Mapping[str, np.ndarray]
"""Input tensors by signature input name; anything numpy.asarray takes (strings: arrays of bytes or str)."""


@dataclass(frozen=True)
class Prediction:
    """The answer of one predict call."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]


def input_arrays(inputs: Inputs) -> dict[str, np.ndarray]:
    """numpy arrays of the inputs, str elements as UTF-8 bytes; InvalidArgument naming an input of no tensor type."""
    if not inputs:
        raise InvalidArgument("give at least one input tensor")
    arrays = {}
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = np.char.encode(array, "utf-8").astype(object)
        try:
            element_type_of(array)
        except InvalidArgument as exc:
            raise InvalidArgument(f"input {name!r}: {exc}") from None
        arrays[name] = array
    return arrays


def predict_request(model: ModelRef | str, inputs: Inputs, outputs: Sequence[str] = ()) -> pb.PredictRequest:
    """The PredictRequest of `predict`."""
    tensors = {name: array_to_tensor(array) for name, array in input_arrays(inputs).items()}
    return pb.PredictRequest(model=ref_to_pb(model), inputs=tensors, output_filter=list(outputs))


def prediction_of(reply: pb.PredictResponse) -> Prediction:
    outputs = {name: tensor_to_array(tensor, f"output {name}") for name, tensor in reply.outputs.items()}
    return Prediction(reply.model_name, reply.version, outputs)


MESSAGE_BYTES = 4 * 1024 * 1024
"""About how many bytes of records one BatchPredict message carries (at least one record each)."""


def batch_requests(
    model: ModelRef | str, inputs: Inputs, *, batch_size: int = 0, outputs: Sequence[str] = ()
) -> Iterator[pb.BatchPredictRequest]:
    """The stream of BatchPredict: the spec, then the records, about MESSAGE_BYTES of them per message. The inputs
    are checked here, before any message is sent."""
    arrays = input_arrays(inputs)
    counts = {len(array) if array.ndim else -1 for array in arrays.values()}
    if len(counts) != 1 or -1 in counts:
        raise InvalidArgument("every input of a batch job needs the same first dimension: one row per record")
    total = counts.pop()
    row_bytes = sum(array.nbytes // max(total, 1) for array in arrays.values())  # strings: their pointers only
    per_message = max(1, MESSAGE_BYTES // max(row_bytes, 1))
    spec = pb.BatchJobSpec(model=ref_to_pb(model), output_filter=list(outputs), batch_size=batch_size)

    def messages() -> Iterator[pb.BatchPredictRequest]:
        yield pb.BatchPredictRequest(spec=spec)
        for start in range(0, total, per_message):
            part = {name: array_to_tensor(array[start : start + per_message]) for name, array in arrays.items()}
            yield pb.BatchPredictRequest(records=pb.Records(inputs=part))

    return messages()


class PredictorClient(Calls):
    """Blocking client of the predictor's own API, directly or through the gateway."""

    service = SERVICE

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = TIMEOUT, metadata: Metadata = ()) -> None:
        super().__init__(predictor_pb2_grpc.PredictorStub(channel), timeout, metadata)

    def predict(self, model: ModelRef | str, inputs: Inputs, *, outputs: Sequence[str] = ()) -> Prediction:
        """Runs `model` (a name, "name@alias" or "name:version") on `inputs`; only `outputs` when given."""
        reply = self._call(self.stub.Predict, predict_request(model, inputs, outputs))
        return prediction_of(reply)

    def metadata(self, name: str) -> pb.ModelStatus:
        """The served versions of `name`, their states, and its signature's inputs and outputs."""
        return self._call(self.stub.GetModelMetadata, pb.GetModelMetadataRequest(name=name))

    def list_models(self) -> list[pb.ModelStatus]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def batch_predict(
        self, model: ModelRef | str, inputs: Inputs, *, batch_size: int = 0, outputs: Sequence[str] = ()
    ) -> pb.BatchJob:
        """Starts a batch job over the records of `inputs` (first dimension: records); returns it QUEUED or
        RUNNING. Its results are a registry blob (`output_digest`) once it SUCCEEDED: follow it with
        `batch_job`."""
        requests = batch_requests(model, inputs, batch_size=batch_size, outputs=outputs)
        return self._call(self.stub.BatchPredict, requests)

    def batch_job(self, job_id: str) -> pb.BatchJob:
        return self._call(self.stub.GetBatchJob, pb.GetBatchJobRequest(id=job_id))

    def cancel_batch_job(self, job_id: str) -> pb.BatchJob:
        return self._call(self.stub.CancelBatchJob, pb.CancelBatchJobRequest(id=job_id))


class AsyncPredictorClient(AsyncCalls):
    """asyncio client of the predictor's own API: `PredictorClient`'s calls, awaited."""

    service = SERVICE

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float | None = TIMEOUT, metadata: Metadata = ()) -> None:
        super().__init__(predictor_pb2_grpc.PredictorStub(channel), timeout, metadata)

    async def predict(self, model: ModelRef | str, inputs: Inputs, *, outputs: Sequence[str] = ()) -> Prediction:
        reply = await self._call(self.stub.Predict, predict_request(model, inputs, outputs))
        return prediction_of(reply)

    async def metadata(self, name: str) -> pb.ModelStatus:
        return await self._call(self.stub.GetModelMetadata, pb.GetModelMetadataRequest(name=name))

    async def list_models(self) -> list[pb.ModelStatus]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def batch_predict(
        self, model: ModelRef | str, inputs: Inputs, *, batch_size: int = 0, outputs: Sequence[str] = ()
    ) -> pb.BatchJob:
        requests = batch_requests(model, inputs, batch_size=batch_size, outputs=outputs)
        return await self._call(self.stub.BatchPredict, requests)

    async def batch_job(self, job_id: str) -> pb.BatchJob:
        return await self._call(self.stub.GetBatchJob, pb.GetBatchJobRequest(id=job_id))

    async def cancel_batch_job(self, job_id: str) -> pb.BatchJob:
        return await self._call(self.stub.CancelBatchJob, pb.CancelBatchJobRequest(id=job_id))
