"""Thin servicer of the Open Inference Protocol (`inference.GRPCInferenceService`, what tritonclient speaks) over
the Inference core and ModelControl.

Model versions are strings. modelgrid reads them as: "" -> the model's default version (the newest available on
this replica), digits -> that exact version, anything else -> an alias name (an extension of the protocol: e.g.
`model_version="production"` runs whatever version the `production` alias routes to here).

Inference results always travel in raw_output_contents (tritonclient's `as_numpy` reads only those). Requests may
use raw_input_contents (what tritonclient sends) or typed contents. The request parameters "sequence_id" and
"priority" are accepted and ignored (models here are stateless and share one queue); "timeout" (microseconds)
shortens the deadline.
"""

import asyncio
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from modelgrid.client.convert import parse_number
from modelgrid.client.errors import FailedPrecondition, InvalidArgument, ModelgridError
from modelgrid.client.modelref import ModelRef, check_alias, check_model_name
from modelgrid.client.tensors import BY_NAME
from modelgrid.oip import grpc_service_pb2 as pb
from modelgrid.oip import grpc_service_pb2_grpc
from services.kit.interceptors import status_of
from services.predictor.control import ModelControl
from services.predictor.converters import deadline_of, request_budget, run_conversion, string_work
from services.predictor.domain import ModelState, VersionState
from services.predictor.inference import Inference
from services.predictor.protocols import oip_tensors
from services.predictor.runtime import IOSpec
from services.predictor.settings import DEFAULT_MAX_REQUEST_BYTES
from services.predictor.siblings import Siblings
from services.predictor.streams import answer_concurrently

logger = logging.getLogger(__name__)

SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]
SERVER_NAME = "modelgrid-predictor"
PLATFORM = "tensorflow_savedmodel"
PROTOCOL = "oip"
INDEX_STATE = {
    VersionState.AVAILABLE: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.PREPARED: "LOADING",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.FAILED: "UNAVAILABLE",
}
INDEX_MODEL_STATE = {  # a model listed without versions
    ModelState.LOADING: "LOADING",
    ModelState.AVAILABLE: "READY",
    ModelState.UNAVAILABLE: "UNAVAILABLE",
}
UNSUPPORTED_LOAD_PARAMETERS = (
    "modelgrid loads models from its registry; 'config' and 'file:' overrides are not supported"
)


def ref_of(name: str, version: str) -> ModelRef:
    """A model reference from an OIP name and version string ("", digits, or an alias name)."""
    check_model_name(name)
    if not version:
        return ModelRef(name)
    if version.isdigit():
        number = parse_number(version, "model_version")
        if number < 1:
            raise InvalidArgument("model_version: versions start at 1")
        return ModelRef(name, version=number)
    try:
        return ModelRef(name, alias=check_alias(version))
    except InvalidArgument:
        raise InvalidArgument(
            f'model_version {version!r} is neither a version number nor an alias name; use "" for the default, '
            'a number such as "3", or an alias such as "production"'
        ) from None


def _tensor_metadata(spec: IOSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=BY_NAME[spec.dtype].oip, shape=spec.shape)


def _request_deadline(request: pb.ModelInferRequest, deadline: float | None) -> float | None:
    """The earlier of the call's deadline and the request's "timeout" parameter (microseconds)."""
    if "timeout" not in request.parameters:
        return deadline
    parameter = request.parameters["timeout"]
    which = parameter.WhichOneof("parameter_choice")
    micros = getattr(parameter, which) if which in ("int64_param", "uint64_param") else 0
    if micros <= 0:
        return deadline
    own = time.monotonic() + micros / 1e6
    return own if deadline is None else min(deadline, own)


def _response(request: pb.ModelInferRequest, prediction) -> pb.ModelInferResponse:
    """The response: the requested outputs (or all, by name) in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=prediction.model, model_version=str(prediction.version), id=request.id)
    names = [o.name for o in request.outputs] or sorted(prediction.outputs)
    for name in dict.fromkeys(names):
        datatype, shape, raw = oip_tensors.raw_output(prediction.outputs[name])
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Adapts OIP calls to Inference and ModelControl."""

    def __init__(
        self,
        inference: Inference,
        control: ModelControl,
        ready: Callable[[], bool],
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        siblings: Siblings | None = None,
    ) -> None:
        self._siblings = siblings or Siblings()
        self._inference = inference
        self._control = control
        self._ready = ready
        self._max_request_bytes = max_request_bytes
        try:
            self._version = importlib.metadata.version("modelgrid")
        except importlib.metadata.PackageNotFoundError:
            self._version = ""

    # -- health and metadata -----------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._control.is_ready(ref_of(request.name, request.version)))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=["model_repository"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        version = self._control.describe(ref_of(request.name, request.version))
        model = self._control.status(version.model)
        return pb.ModelMetadataResponse(
            name=version.model,
            versions=[str(v.version) for v in model.available],
            platform=PLATFORM,
            inputs=[_tensor_metadata(s) for s in version.signature.inputs],
            outputs=[_tensor_metadata(s) for s in version.signature.outputs],
        )

    # -- inference ---------------------------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        ref = ref_of(request.model_name, request.model_version)
        for output in request.outputs:
            if "classification" in output.parameters:
                raise InvalidArgument(f"output {output.name!r}: the classification extension is not supported")
        budget = request_budget(self._max_request_bytes)
        inputs = await run_conversion(
            oip_tensors.decode_work(request.inputs, request.raw_input_contents),
            lambda: oip_tensors.arrays_from_inputs(request.inputs, request.raw_input_contents, budget),
        )
        prediction = await self._inference.predict(
            ref,
            inputs,
            [output.name for output in request.outputs],
            deadline=_request_deadline(request, deadline),
            protocol=PROTOCOL,
        )
        return await run_conversion(string_work(prediction.outputs.values()), lambda: _response(request, prediction))

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context):
        """Requests run concurrently (so they batch with each other); results come back as they finish, each
        carrying its request's id. A failed request yields a response with error_message; the stream goes on."""
        deadline = deadline_of(context)

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
            except ModelgridError as exc:
                return _stream_error(request, f"{status_of(exc).name}: {exc}")
            except Exception as exc:  # noqa: BLE001 - one failed request must not end the stream
                incident = uuid.uuid4().hex[:12]
                logger.error("unexpected error in ModelStreamInfer (incident %s)", incident, exc_info=exc)
                return _stream_error(request, f"INTERNAL: internal error (incident {incident})")

        async for response in answer_concurrently(request_iterator, answer):
            yield response

    # -- model repository --------------------------------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        """Every served model's versions and their states; a model without versions is listed once, UNAVAILABLE
        (or LOADING before its first reconciliation) with the reason. There is one repository: the registry."""
        index = []
        for model in self._control.index():
            if not model.versions:
                state = INDEX_MODEL_STATE[model.state]
                index.append(pb.RepositoryIndexResponse.ModelIndex(name=model.name, state=state, reason=model.reason))
            for version in model.versions:
                index.append(
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=model.name,
                        version=str(version.version),
                        state=INDEX_STATE[version.state],
                        reason=version.reason,
                    )
                )
        if request.ready:
            index = [entry for entry in index if entry.state == "READY"]
        return pb.RepositoryIndexResponse(models=index)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        """Loads (or reloads) a model from the registry and waits. A newly loaded model gets the default policy
        (its newest READY version); a served one keeps its policy. FAILED_PRECONDITION when no version loaded."""
        name = check_model_name(request.model_name)
        if any(key == "config" or key.startswith("file:") for key in request.parameters):
            raise InvalidArgument(UNSUPPORTED_LOAD_PARAMETERS)
        method = "/inference.GRPCInferenceService/RepositoryModelLoad"
        model, _ = await asyncio.gather(
            self._control.load(name, wait=True, keep_if_empty=False), self._siblings.call(method, request, context)
        )
        if model.available:
            return pb.RepositoryModelLoadResponse()
        raise FailedPrecondition(f"model {name!r} did not load: {model.failure()}")

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        method = "/inference.GRPCInferenceService/RepositoryModelUnload"
        name = check_model_name(request.model_name)
        await asyncio.gather(self._control.unload(name), self._siblings.call(method, request, context))
        return pb.RepositoryModelUnloadResponse()


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A stream response for a failed request: the message, and the request's identity so a client can match it."""
    echo = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)


def add_to_server(
    server: grpc.aio.Server,
    inference: Inference,
    control: ModelControl,
    ready: Callable[[], bool],
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    siblings: Siblings | None = None,
) -> None:
    """Adds the OIP servicer; `ready()` answers ServerReady (True once the configured models had their first load),
    `max_request_bytes` bounds the decoded inputs of one request (MODELGRID_PREDICTOR_MAX_REQUEST_BYTES), and
    repository loads and unloads reach the replica's other processes through `siblings`."""
    servicer = InferenceServicer(inference, control, ready, max_request_bytes, siblings)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
