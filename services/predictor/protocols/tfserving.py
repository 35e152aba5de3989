"""Thin servicers of TensorFlow Serving's `PredictionService` (Predict, GetModelMetadata) and `ModelService`
(GetModelStatus) over the Inference core, so tensorflow-serving-api clients work unchanged.

A ModelSpec selects a version by `version` (exact number), by `version_label` (an alias served on this replica)
or by neither (the newest available version). Classify, Regress, MultiInference and HandleReloadConfigRequest
answer UNIMPLEMENTED: they need tf.Example signatures or TF Serving's own config, which modelgrid does not have.
"""

import grpc
from google.protobuf import wrappers_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.apis import status_pb2 as tfs_status_pb2

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import ModelRef, check_alias, check_model_name
from modelgrid.client.tensors import BY_NAME, input_label
from services.predictor.control import ModelControl
from services.predictor.converters import deadline_of, request_budget, run_conversion, string_work
from services.predictor.domain import VersionState, VersionStatus
from services.predictor.inference import Inference
from services.predictor.protocols.tf_tensors import (
    array_from_tensor_proto,
    decode_work,
    shape_proto,
    tensor_proto_from_array,
)
from services.predictor.runtime import IOSpec, ModelSignature
from services.predictor.settings import DEFAULT_MAX_REQUEST_BYTES

SERVICE_NAMES = [
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
]
PROTOCOL = "tfserving"
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_FIELD = "signature_def"
ERROR_UNKNOWN = 2  # tensorflow.error.Code.UNKNOWN
STATUS_STATE = {
    VersionState.LOADING: get_model_status_pb2.ModelVersionStatus.LOADING,
    VersionState.PREPARED: get_model_status_pb2.ModelVersionStatus.LOADING,
    VersionState.AVAILABLE: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
    VersionState.UNLOADING: get_model_status_pb2.ModelVersionStatus.UNLOADING,
    VersionState.FAILED: get_model_status_pb2.ModelVersionStatus.END,
}


def ref_of(spec: model_pb2.ModelSpec) -> ModelRef:
    """A model reference from a ModelSpec: `version` -> exact version, `version_label` -> alias, else default."""
    check_model_name(spec.name)
    which = spec.WhichOneof("version_choice")
    if which == "version":
        if spec.version.value < 1:
            raise InvalidArgument(f"model_spec.version {spec.version.value}: versions start at 1")
        return ModelRef(spec.name, version=spec.version.value)
    if which == "version_label":
        return ModelRef(spec.name, alias=check_alias(spec.version_label))
    return ModelRef(spec.name)


def check_signature_name(requested: str, signature: ModelSignature, model: str) -> None:
    """Accepts the served signature's name or an empty one (meaning the served signature)."""
    if requested and requested != signature.name:
        raise InvalidArgument(
            f"signature {requested!r} is not served for {model!r}; it serves {signature.name!r} (or leave "
            "signature_name empty)"
        )


def inputs_of(request: predict_pb2.PredictRequest, max_request_bytes: int) -> dict:
    """The request's input arrays, checked against their shapes and, together, against `max_request_bytes`."""
    budget = request_budget(max_request_bytes)
    return {name: array_from_tensor_proto(t, input_label(name), budget) for name, t in request.inputs.items()}


def fill_outputs(response: predict_pb2.PredictResponse, outputs: dict) -> predict_pb2.PredictResponse:
    """`response` with every output as a TensorProto."""
    for name, array in outputs.items():
        response.outputs[name].CopyFrom(tensor_proto_from_array(array))
    return response


def model_spec_of(version: VersionStatus) -> model_pb2.ModelSpec:
    return model_pb2.ModelSpec(
        name=version.model,
        version=wrappers_pb2.Int64Value(value=version.version),
        signature_name=version.signature.name,
    )


def _tensor_info(spec: IOSpec) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(name=spec.name, dtype=BY_NAME[spec.dtype].tf, tensor_shape=shape_proto(spec.shape))


def signature_def_map(signature: ModelSignature) -> get_model_metadata_pb2.SignatureDefMap:
    """The served signature as TF Serving describes it."""
    signature_def = meta_graph_pb2.SignatureDef(
        inputs={s.name: _tensor_info(s) for s in signature.inputs},
        outputs={s.name: _tensor_info(s) for s in signature.outputs},
        method_name=PREDICT_METHOD,
    )
    return get_model_metadata_pb2.SignatureDefMap(signature_def={signature.name: signature_def})


async def _unimplemented(context: grpc.aio.ServicerContext, method: str) -> None:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by modelgrid; use Predict with the serving signature"
    )


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Adapts TF Serving's PredictionService to Inference and ModelControl."""

    def __init__(
        self, inference: Inference, control: ModelControl, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ) -> None:
        self._inference = inference
        self._control = control
        self._max_request_bytes = max_request_bytes

    async def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        ref = ref_of(request.model_spec)
        signature = self._control.signature_of(ref)
        check_signature_name(request.model_spec.signature_name, signature, ref.name)
        work = sum(decode_work(t) for t in request.inputs.values())
        inputs = await run_conversion(work, lambda: inputs_of(request, self._max_request_bytes))
        prediction = await self._inference.predict(
            ref, inputs, list(request.output_filter), deadline=deadline_of(context), protocol=PROTOCOL
        )
        response = predict_pb2.PredictResponse(
            model_spec=model_pb2.ModelSpec(
                name=prediction.model,
                version=wrappers_pb2.Int64Value(value=prediction.version),
                signature_name=signature.name,
            )
        )
        outputs = prediction.outputs
        return await run_conversion(string_work(outputs.values()), lambda: fill_outputs(response, outputs))

    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument(f"metadata_field is empty; ask for [{SIGNATURE_DEF_FIELD!r}]")
        unsupported = sorted(set(fields) - {SIGNATURE_DEF_FIELD})
        if unsupported:
            raise InvalidArgument(f"metadata_field {unsupported} not supported; only {SIGNATURE_DEF_FIELD!r} is")
        served = self._control.describe(ref_of(request.model_spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=model_spec_of(served))
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(served.signature))
        return response

    async def Classify(self, request, context):
        await _unimplemented(context, "Classify")

    async def Regress(self, request, context):
        await _unimplemented(context, "Regress")

    async def MultiInference(self, request, context):
        await _unimplemented(context, "MultiInference")


class ModelStatusServicer(model_service_pb2_grpc.ModelServiceServicer):
    """TF Serving's ModelService: the load state of a model's versions on this replica."""

    def __init__(self, control: ModelControl) -> None:
        self._control = control

    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in self._control.versions_of(ref_of(request.model_spec)):
            status = tfs_status_pb2.StatusProto()
            if version.state == VersionState.FAILED:
                status.error_code = ERROR_UNKNOWN
                status.error_message = version.reason
            response.model_version_status.add(version=version.version, state=STATUS_STATE[version.state], status=status)
        return response

    async def HandleReloadConfigRequest(self, request, context):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "modelgrid predictors take their models from settings and the registry; use the predictor's LoadModel",
        )


def add_to_server(
    server: grpc.aio.Server,
    inference: Inference,
    control: ModelControl,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Adds TF Serving's PredictionService and ModelService."""
    prediction = PredictionServicer(inference, control, max_request_bytes)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusServicer(control), server)
