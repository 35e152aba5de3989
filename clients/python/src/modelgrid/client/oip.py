"""Open Inference Protocol (KServe v2) clients, numpy in and out: `InferenceClient` / `AsyncInferenceClient` speak
to modelgrid's predictors and gateway, and to any other OIP server.

    with connect("127.0.0.1:8080", api_key=key) as channel:
        answer = InferenceClient(channel).infer("digits", {"x": np.zeros((1, 64), np.float32)})

The protocol's messages (proto package `inference`, here as modelgrid.oip) are the same ones tritonclient.grpc
defines: a process can load one of the two, not both.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import numpy as np

from modelgrid.client.calls import AsyncCalls, Calls, Metadata
from modelgrid.client.errors import InvalidArgument
from modelgrid.client.predictor import SERVICE, TIMEOUT, Inputs, input_arrays
from modelgrid.client.tensors import BY_OIP, CONTENTS_FIELD, array_from_raw, element_count, element_type_of, raw_of
from modelgrid.oip import grpc_service_pb2 as oip
from modelgrid.oip import grpc_service_pb2_grpc as oip_grpc


@dataclass(frozen=True)
class Inference:
    """The answer of one OIP infer call."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]


def infer_request(model: str, inputs: Inputs, version: str = "", outputs: Sequence[str] = ()) -> oip.ModelInferRequest:
    """A ModelInferRequest with every input in raw_input_contents (the compact form every OIP server takes)."""
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    for name, array in input_arrays(inputs).items():
        element = element_type_of(array)
        request.inputs.add(name=name, datatype=element.oip, shape=array.shape)
        request.raw_input_contents.append(raw_of(array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def inference_of(reply: oip.ModelInferResponse) -> Inference:
    """numpy arrays of a ModelInferResponse's outputs, whether they came as raw contents or typed contents;
    InvalidArgument for an output that does not hold what its datatype and shape say."""
    outputs = {}
    for index, tensor in enumerate(reply.outputs):
        what = f"output {tensor.name[:64]!r}"
        element = BY_OIP.get(tensor.datatype)
        if element is None:
            raise InvalidArgument(f"{what} has an unknown datatype {tensor.datatype[:16]!r}")
        shape = tuple(tensor.shape)
        if index < len(reply.raw_output_contents):
            outputs[tensor.name] = array_from_raw(reply.raw_output_contents[index], element, shape, what)
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise InvalidArgument(f"{what}: {tensor.datatype} travels only as raw contents, and the reply has none")
        values = list(getattr(tensor.contents, field))
        count = element_count(shape, what)
        if len(values) != count:
            raise InvalidArgument(f"{what}: {len(values)} values do not fill shape {list(shape)} ({count})")
        array = np.asarray(values, dtype=element.numpy if element.numpy is not None else object)
        outputs[tensor.name] = array.reshape(shape)
    return Inference(reply.model_name, reply.model_version, outputs)


class InferenceClient(Calls):
    """Blocking Open Inference Protocol client (KServe v2 over gRPC)."""

    service = SERVICE

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = TIMEOUT, metadata: Metadata = ()) -> None:
        super().__init__(oip_grpc.GRPCInferenceServiceStub(channel), timeout, metadata)

    def infer(self, model: str, inputs: Inputs, *, version: str = "", outputs: Sequence[str] = ()) -> Inference:
        reply = self._call(self.stub.ModelInfer, infer_request(model, inputs, version, outputs))
        return inference_of(reply)

    def server_ready(self) -> bool:
        return self._call(self.stub.ServerReady, oip.ServerReadyRequest()).ready

    def model_ready(self, model: str, version: str = "") -> bool:
        return self._call(self.stub.ModelReady, oip.ModelReadyRequest(name=model, version=version)).ready

    def model_metadata(self, model: str, version: str = "") -> oip.ModelMetadataResponse:
        return self._call(self.stub.ModelMetadata, oip.ModelMetadataRequest(name=model, version=version))


class AsyncInferenceClient(AsyncCalls):
    """asyncio Open Inference Protocol client: `InferenceClient`'s calls, awaited."""

    service = SERVICE

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float | None = TIMEOUT, metadata: Metadata = ()) -> None:
        super().__init__(oip_grpc.GRPCInferenceServiceStub(channel), timeout, metadata)

    async def infer(self, model: str, inputs: Inputs, *, version: str = "", outputs: Sequence[str] = ()) -> Inference:
        reply = await self._call(self.stub.ModelInfer, infer_request(model, inputs, version, outputs))
        return inference_of(reply)

    async def server_ready(self) -> bool:
        return (await self._call(self.stub.ServerReady, oip.ServerReadyRequest())).ready

    async def model_ready(self, model: str, version: str = "") -> bool:
        return (await self._call(self.stub.ModelReady, oip.ModelReadyRequest(name=model, version=version))).ready

    async def model_metadata(self, model: str, version: str = "") -> oip.ModelMetadataResponse:
        return await self._call(self.stub.ModelMetadata, oip.ModelMetadataRequest(name=model, version=version))
