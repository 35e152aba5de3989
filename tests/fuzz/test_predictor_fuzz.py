"""Fuzzing the predictor on its three protocols: modelgrid.predictor.v1.Predictor, the Open Inference Protocol
(inference.GRPCInferenceService) and TensorFlow Serving's PredictionService and ModelService, every RPC, against a
real predictor process serving a real SavedModel (float32 x [batch, 4] -> y [batch, 3]) from a real registry, so
that generated tensors go through the real decoding, batching and TensorFlow paths. Then the predictor must still
be alive, SERVING, and predict.

The seeds are valid requests of each method (a Predict of the served model, an OIP ModelInfer with typed and with
raw contents, a TF Serving Predict with float_val and with tensor_content); mutating them keeps most cases past the
model lookup. Methods that change what is served (LoadModel, UnloadModel, the OIP repository calls) run last, and
the unloading ones never name the served model."""

import re
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from modelgrid.client.tensors import array_to_tensor, tensor_to_array
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.kit.localinfra import ConsulAgent
from services.kit.processes import REPO_ROOT

# tritonclient's copy of the OIP messages: the project's own (`inference`) must not load in a test process that also
# uses tritonclient (the same proto file twice in one descriptor pool).
from tritonclient.grpc import service_pb2 as oip  # isort: skip

pytestmark = pytest.mark.slow  # services as subprocesses (kept in the default run)

X = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.7, 2.2]], dtype=np.float32)
TIMEOUT_S = 20.0
CHANGES_SERVING = ("LoadModel", "UnloadModel", "RepositoryModelLoad", "RepositoryModelUnload")
UNLOADS = ("UnloadModel", "RepositoryModelUnload")
# TF Serving methods that need tf.Example signatures or TF Serving's own config: documented as not served.
NOT_SERVED = ("Classify", "Regress", "MultiInference", "HandleReloadConfigRequest")
# The predictor's documented UNAVAILABLE: a model it serves has no available version (still loading, or failed),
# or the version is being unloaded (the gateway then tries another replica).
UNAVAILABLE_DETAILS = {grpc.StatusCode.UNAVAILABLE: r"has no available version|is unloading"}


def _tf_serving():
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        inference_pb2,
        model_pb2,
        model_service_pb2,
        predict_pb2,
        prediction_service_pb2,
        regression_pb2,
    )

    return SimpleNamespace(
        classification=classification_pb2,
        metadata=get_model_metadata_pb2,
        status=get_model_status_pb2,
        inference=inference_pb2,
        model=model_pb2,
        model_service=model_service_pb2,
        predict=predict_pb2,
        prediction_service=prediction_service_pb2,
        regression=regression_pb2,
    )


TFS = _tf_serving()
SERVICES = [
    pb.DESCRIPTOR.services_by_name["Predictor"],
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    TFS.prediction_service.DESCRIPTOR.services_by_name["PredictionService"],
    TFS.model_service.DESCRIPTOR.services_by_name["ModelService"],
]
# tritonclient's service also has Triton's own extensions (shared memory, statistics, trace settings...); the
# predictor serves the Open Inference Protocol as protos/modelgrid/oip/grpc_service.proto declares it.
OIP_PROTO = REPO_ROOT / "protos" / "modelgrid" / "oip" / "grpc_service.proto"
OIP_METHODS = set(re.findall(r"^\s*rpc\s+(\w+)", OIP_PROTO.read_text(), re.MULTILINE))
METHODS = sorted(
    [
        m
        for service in SERVICES
        for m in service.methods
        if service.full_name != "inference.GRPCInferenceService" or m.name in OIP_METHODS
    ],
    key=lambda m: (m.name in CHANGES_SERVING, m.name in UNLOADS),
)


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, channel_to, unique, build_saved_model):
    """Own Consul agent, a registry with one model (version 1, alias production) and a predictor serving it."""
    tmp = tmp_path_factory.mktemp("fuzz-predictor")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        registry_channel, client = client_for(registry)
        model = unique("fzp")
        client.ensure_model(model)
        client.push_savedmodel(model, build_saved_model(tmp / "model", seed=1))
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
        predictor = launch.predictor(
            consul.http_url,
            redis_server.url,
            tmp,
            [{"name": model, "aliases": ["production"]}],
            MAX_QUEUE_DELAY_MS="2",
            WARMUP_REQUESTS="0",
        )
        channel = channel_to(predictor)
        try:
            yield SimpleNamespace(
                registry=registry, predictor=predictor, channel=channel, model=model, registry_channel=registry_channel
            )
        finally:
            channel.close()
            registry_channel.close()
            predictor.stop()
            registry.stop()


def seeds(model: str) -> dict[str, list]:
    """Valid requests per method name (the three protocols' names do not clash where it matters)."""
    ref = common_pb2.ModelRef(name=model, alias="production")
    predict = pb.PredictRequest(model=ref, inputs={"x": array_to_tensor(X)}, output_filter=["y"])
    typed = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 4])
    typed.contents.fp32_contents.extend(X.ravel().tolist())
    infer_typed = oip.ModelInferRequest(model_name=model, model_version="1", id="t", inputs=[typed])
    infer_typed.outputs.add(name="y")
    raw = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 4])
    infer_raw = oip.ModelInferRequest(
        model_name=model, model_version="production", inputs=[raw], raw_input_contents=[X.tobytes()]
    )
    infer_raw.parameters["timeout"].int64_param = 5_000_000
    spec = TFS.model.ModelSpec(name=model, version_label="production", signature_name="serving_default")
    import tensorflow as tf

    tf_float = TFS.predict.PredictRequest(model_spec=spec, output_filter=["y"])
    tf_float.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    tf_content = TFS.predict.PredictRequest(model_spec=TFS.model.ModelSpec(name=model))
    tf_content.inputs["x"].dtype = tf.float32.as_datatype_enum
    tf_content.inputs["x"].tensor_shape.dim.add(size=2)
    tf_content.inputs["x"].tensor_shape.dim.add(size=4)
    tf_content.inputs["x"].tensor_content = X.tobytes()
    batch_spec = pb.BatchJobSpec(model=ref, batch_size=2)
    return {
        "Predict": [predict, tf_float, tf_content],
        "PredictStream": [pb.PredictStreamRequest(id="1", request=predict)],
        "BatchPredict": [
            pb.BatchPredictRequest(spec=batch_spec),
            pb.BatchPredictRequest(records=pb.Records(inputs={"x": array_to_tensor(X)})),
        ],
        "GetBatchJob": [pb.GetBatchJobRequest(id="0123456789ab")],
        "ListBatchJobs": [pb.ListBatchJobsRequest(page=common_pb2.PageRequest(page_size=2))],
        "CancelBatchJob": [pb.CancelBatchJobRequest(id="0123456789ab")],
        "GetModelMetadata": [
            pb.GetModelMetadataRequest(name=model),
            TFS.metadata.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"]),
        ],
        "ListModels": [pb.ListModelsRequest()],
        "LoadModel": [pb.LoadModelRequest(name=model, policy=pb.VersionPolicy(latest=1), wait=True)],
        "UnloadModel": [pb.UnloadModelRequest(name=f"{model}-absent")],
        "ModelInfer": [infer_typed, infer_raw],
        "ModelStreamInfer": [infer_typed, infer_raw],
        "ModelMetadata": [oip.ModelMetadataRequest(name=model, version="production")],
        "ModelReady": [oip.ModelReadyRequest(name=model, version="1")],
        "RepositoryIndex": [oip.RepositoryIndexRequest(ready=True)],
        "RepositoryModelLoad": [oip.RepositoryModelLoadRequest(model_name=model)],
        "RepositoryModelUnload": [oip.RepositoryModelUnloadRequest(model_name=f"{model}-absent")],
        "GetModelStatus": [TFS.status.GetModelStatusRequest(model_spec=spec)],
        "Classify": [TFS.classification.ClassificationRequest(model_spec=spec)],
        "Regress": [TFS.regression.RegressionRequest(model_spec=spec)],
        "MultiInference": [TFS.inference.MultiInferenceRequest()],
    }


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_predictor_rpc(method, mesh, fuzz, protofuzz):
    """Every RPC of the three protocols with generated, mutated and malformed requests: never INTERNAL or
    UNKNOWN, never a hang, and UNAVAILABLE only as documented."""
    hints = ["production", "x", "y", "serving_default", "FP32", "1"]
    if method.name not in UNLOADS:
        hints.append(mesh.model)
    strategies = protofuzz(hints=hints, byte_hints=[X.tobytes(), X[:1].tobytes(), X.astype(np.float64).tobytes()])
    message_seeds = [s for s in seeds(mesh.model).get(method.name, ()) if s.DESCRIPTOR is method.input_type]
    case = strategies.case(method, message_seeds)
    allow = [grpc.StatusCode.UNIMPLEMENTED] if method.name in NOT_SERVED else []

    def body(request) -> None:
        fuzz.call_method(
            mesh.channel, method, request, timeout=TIMEOUT_S, allow=allow, allow_details=UNAVAILABLE_DETAILS
        )

    fuzz.run(case, body, services=[mesh.predictor, mesh.registry])


def test_predictor_stays_healthy(mesh, service_health):
    """Alive and SERVING; and once the model's policy is set back (LoadModel cases may have changed it, as they
    may), it predicts."""
    service_health(mesh.predictor, mesh.channel)
    service_health(mesh.registry, mesh.registry_channel)
    stub = predictor_pb2_grpc.PredictorStub(mesh.channel)
    policy = pb.VersionPolicy(aliases=pb.Aliases(aliases=["production"]))
    stub.LoadModel(pb.LoadModelRequest(name=mesh.model, policy=policy, wait=True), timeout=60)
    ref = common_pb2.ModelRef(name=mesh.model, alias="production")
    reply = stub.Predict(pb.PredictRequest(model=ref, inputs={"x": array_to_tensor(X)}), timeout=30)
    assert reply.version == 1 and tensor_to_array(reply.outputs["y"]).shape == (2, 3)
