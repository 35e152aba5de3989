"""Bytes that do not parse as a method's request message get INVALID_ARGUMENT from every service, on unary calls
and on streams alike; a malformed message on a bidirectional stream ends that stream at once (it used to hang until
the deadline), and the services stay healthy. Real registry and predictor processes, raw bytes over real channels."""

import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.kit.localinfra import ConsulAgent

GARBAGE = b"\xff\xff\xff\xff\x0f not a protobuf"
END_WITHIN_S = 5.0  # a stream with a malformed message ends this soon, though the client keeps it open


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model):
    tmp = tmp_path_factory.mktemp("malformed")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        model = unique("malformed")
        client.ensure_model(model)
        client.push_savedmodel(model, build_saved_model(tmp / "model", seed=1))
        predictor = launch.predictor(consul.http_url, redis_server.url, tmp, [{"name": model}])
        with predictor.channel() as predictor_channel:
            yield SimpleNamespace(registry=channel, predictor=predictor_channel, model=model)
        channel.close()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert "does not parse" in err.value.details() or err.value.code() != grpc.StatusCode.INVALID_ARGUMENT
    return err.value.code()


def raw(channel: grpc.Channel, kind: str, method: str):
    """A method of `channel` that sends raw bytes and reads raw bytes."""
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)


def test_unary_and_client_streaming_calls(mesh):
    get_model = raw(mesh.registry, "unary_unary", "/modelgrid.registry.v1.ModelRegistry/GetModel")
    assert code_of(lambda: get_model(GARBAGE, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    upload = raw(mesh.registry, "stream_unary", "/modelgrid.registry.v1.ModelRegistry/UploadBlob")
    assert code_of(lambda: upload(iter([GARBAGE]), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    meta = rpb.UploadBlobRequest(metadata=rpb.BlobMetadata(digest="ab" * 32, size_bytes=10)).SerializeToString()
    assert code_of(lambda: upload(iter([meta, GARBAGE]), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    predict = raw(mesh.predictor, "unary_unary", "/modelgrid.predictor.v1.Predictor/Predict")
    assert code_of(lambda: predict(GARBAGE, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    tfs = raw(mesh.predictor, "unary_unary", "/tensorflow.serving.PredictionService/Predict")
    assert code_of(lambda: tfs(GARBAGE, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def held_open(*messages: bytes):
    """The messages, then a stream that stays open (as a client that sends nothing more)."""
    yield from messages
    time.sleep(3 * END_WITHIN_S)


@pytest.mark.parametrize(
    "method",
    ["/modelgrid.predictor.v1.Predictor/PredictStream", "/inference.GRPCInferenceService/ModelStreamInfer"],
)
def test_a_malformed_message_ends_a_bidirectional_stream_at_once(mesh, method):
    x = np.ones((1, 4), np.float32)
    if method.endswith("PredictStream"):
        good = pb.PredictStreamRequest(
            id="ok", request=pb.PredictRequest(model=ref_to_pb(mesh.model), inputs={"x": array_to_tensor(x)})
        ).SerializeToString()
    else:
        # tritonclient's copy of the OIP messages: the project's own (`inference`) must not load in a test process
        # that also uses tritonclient (the same proto file twice in one descriptor pool).
        from tritonclient.grpc import service_pb2 as oip

        tensor = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        good = oip.ModelInferRequest(model_name=mesh.model, id="ok", inputs=[tensor]).SerializeToString()
    stream = raw(mesh.predictor, "stream_stream", method)
    started = time.monotonic()
    call = stream(held_open(good, GARBAGE), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:  # the good request's answer may come first
            pass
    elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in err.value.details()
    assert elapsed < END_WITHIN_S, f"the stream ended after {elapsed:.1f}s"


def test_services_stay_healthy(mesh):
    for channel in (mesh.registry, mesh.predictor):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
