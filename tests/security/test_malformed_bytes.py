"""Class 6, malformed bytes: bytes that do not parse as a method's request message get INVALID_ARGUMENT (never
UNKNOWN or INTERNAL) from every service on every call shape; a malformed message on a bidirectional stream ends that
stream with INVALID_ARGUMENT at once, not at its deadline; cursors and page tokens that no server made are
INVALID_ARGUMENT; and every service stays healthy. Raw bytes over generic channels, directly on each service,
through the gateway and over gRPC-Web."""

import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip  # the project's own `inference` copy must not load here too

from modelgrid.client.tensors import array_to_tensor
from modelgrid.common.v1 import common_pb2
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb

MESH = {"predictor": {}, "trainer": {}}
VIAS = ("direct", "gateway", "web")
GARBAGE = {
    "garbage": b"\xff\xff\xff\xff\x0f not a protobuf",
    "truncated": b"\x0a\x05ab",  # field 1, 5 bytes announced, 2 sent
    "bad-utf8": b"\x0a\x02\xff\xfe",  # field 1 (a string in every request here), not UTF-8
    "bad-varint": b"\x10" + b"\xff" * 11,  # field 2 varint longer than 10 bytes
}
END_WITHIN_S = 5.0
"""A stream with a malformed message ends this soon, though the client holds it open three times longer."""

UNARY = [
    "/modelgrid.registry.v1.ModelRegistry/GetModel",
    "/modelgrid.registry.v1.ModelRegistry/CreateModel",
    "/modelgrid.registry.v1.ModelRegistry/SetAlias",
    "/modelgrid.predictor.v1.Predictor/Predict",
    "/modelgrid.predictor.v1.Predictor/GetModelMetadata",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/tensorflow.serving.PredictionService/Predict",
    "/modelgrid.trainer.v1.Trainer/SubmitJob",
    "/modelgrid.trainer.v1.Trainer/GetJob",
]
STREAMING = [  # (method, kind)
    ("/modelgrid.registry.v1.ModelRegistry/WatchEvents", "unary_stream"),
    ("/modelgrid.registry.v1.ModelRegistry/DownloadArtifact", "unary_stream"),
    ("/modelgrid.trainer.v1.Trainer/WatchJob", "unary_stream"),
    ("/modelgrid.registry.v1.ModelRegistry/UploadBlob", "stream_unary"),
    ("/modelgrid.registry.v1.ModelRegistry/CreateVersion", "stream_unary"),
    ("/modelgrid.predictor.v1.Predictor/BatchPredict", "stream_unary"),
]


def short(method: str) -> str:
    return method.rsplit(".", 1)[-1]


def does_not_parse(outcome) -> None:
    outcome.assert_code(grpc.StatusCode.INVALID_ARGUMENT, "does not parse")


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("method", UNARY, ids=short)
@pytest.mark.parametrize("bad", GARBAGE)
def test_unary_calls_with_bytes_that_do_not_parse_are_invalid_argument(mesh, via, method, bad):
    """Class 6, malformed unary requests: garbage, a truncated field, a string that is not UTF-8 and an over-long
    varint are INVALID_ARGUMENT saying the request does not parse, on each service's unary methods."""
    does_not_parse(mesh.unary(via, method, GARBAGE[bad]))


@pytest.mark.parametrize(
    ("method", "bad"),
    [
        (method, bad)
        for method in ("GetRoutes", "CreateApiKey", "ListApiKeys")
        for bad in GARBAGE
        if bad != "bad-utf8" or method == "CreateApiKey"  # the others take an empty message: field 1 is unknown there
    ],
)
def test_the_gateways_own_api_with_bytes_that_do_not_parse(mesh, method, bad):
    """Class 6, malformed requests to the gateway's own service (GatewayAdmin, admin key sent): INVALID_ARGUMENT."""
    does_not_parse(mesh.unary("gateway", f"/modelgrid.gateway.v1.GatewayAdmin/{method}", GARBAGE[bad]))


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(("method", "kind"), STREAMING, ids=[short(m) for m, _ in STREAMING])
def test_streaming_calls_with_bytes_that_do_not_parse_are_invalid_argument(mesh, via, method, kind):
    """Class 6, malformed messages on server- and client-streaming calls (watches, downloads, uploads, bulk
    jobs): INVALID_ARGUMENT, at once."""
    outcome = mesh.streamed(via, method, [GARBAGE["garbage"]], kind=kind)
    does_not_parse(outcome)
    assert outcome.seconds < END_WITHIN_S, outcome.seconds


@pytest.mark.parametrize("via", VIAS)
def test_a_malformed_message_after_good_ones_on_an_upload(mesh, via):
    """Class 6, a malformed chunk in the middle of a client stream: the upload ends INVALID_ARGUMENT."""
    meta = rpb.UploadBlobRequest(metadata=rpb.BlobMetadata(digest="ab" * 32, size_bytes=10))
    method = "/modelgrid.registry.v1.ModelRegistry/UploadBlob"
    does_not_parse(mesh.streamed(via, method, [meta, GARBAGE["garbage"]], kind="stream_unary"))


def held_open(*messages: bytes):
    """The messages, then a stream that stays open (a client that sends nothing more)."""
    yield from messages
    time.sleep(3 * END_WITHIN_S)


def good_stream_message(mesh, method: str) -> bytes:
    x = np.ones((1, 4), np.float32)
    if method.endswith("PredictStream"):
        request = ppb.PredictRequest(model=common_pb2.ModelRef(name=mesh.model), inputs={"x": array_to_tensor(x)})
        return ppb.PredictStreamRequest(id="ok", request=request).SerializeToString()
    tensor = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return oip.ModelInferRequest(model_name=mesh.model, id="ok", inputs=[tensor]).SerializeToString()


BIDI = ["/modelgrid.predictor.v1.Predictor/PredictStream", "/inference.GRPCInferenceService/ModelStreamInfer"]


@pytest.mark.parametrize("via", ["direct", "gateway"])
@pytest.mark.parametrize("method", BIDI, ids=short)
@pytest.mark.parametrize("first", ["good-first", "garbage-first"])
def test_a_malformed_message_ends_a_bidirectional_stream_at_once(mesh, via, method, first):
    """Class 6, a malformed message on a held-open bidirectional stream (PredictStream, ModelStreamInfer): the
    stream ends INVALID_ARGUMENT within 5 s although the client keeps it open for 15 s and its deadline is 60 s
    (a stream left to its deadline holds the service's resources all that time)."""
    messages = (
        (good_stream_message(mesh, method), GARBAGE["garbage"]) if first == "good-first" else (GARBAGE["garbage"],)
    )
    outcome = mesh.streamed(via, method, held_open(*messages), timeout=60)
    does_not_parse(outcome)
    assert outcome.seconds < END_WITHIN_S, f"the stream ended after {outcome.seconds:.1f}s"


@pytest.mark.parametrize("method", BIDI, ids=short)
def test_a_malformed_message_in_a_grpc_web_stream_body(mesh, method):
    """Class 6, the same over gRPC-Web (its request body holds every message): INVALID_ARGUMENT."""
    does_not_parse(mesh.web_call(method, [good_stream_message(mesh, method), GARBAGE["garbage"]]))


BAD_TOKENS = ["garbage", "-1", "9" * 400, "0-0; DROP", "../../", "\u00e9"]
PAGED = {
    "ListVersions": lambda t: (
        "/modelgrid.registry.v1.ModelRegistry/ListVersions",
        rpb.ListVersionsRequest(model_name="m", page=page(t)),
    ),
    "GetHistory": lambda t: (
        "/modelgrid.registry.v1.ModelRegistry/GetHistory",
        rpb.GetHistoryRequest(model_name="m", page=page(t)),
    ),
    "ListJobs": lambda t: ("/modelgrid.trainer.v1.Trainer/ListJobs", tpb.ListJobsRequest(page_token=t)),
    "ListBatchJobs": lambda t: (
        "/modelgrid.predictor.v1.Predictor/ListBatchJobs",
        ppb.ListBatchJobsRequest(page=page(t)),
    ),
}


def page(token: str) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_token=token)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("listing", PAGED)
def test_page_tokens_no_server_made_are_invalid_argument(mesh, via, listing):
    """Class 6, forged page tokens: a token that no list call returned (words, negative numbers, 400 digits, an
    injection, a path, non-ASCII) is INVALID_ARGUMENT on the list calls of every service."""
    for token in BAD_TOKENS:
        method, request = PAGED[listing](token)
        outcome = mesh.unary(via, method, request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (token, outcome.code.name, outcome.details)


@pytest.mark.parametrize("via", VIAS)
def test_list_models_page_tokens_that_name_no_model_are_invalid_argument(mesh, via):
    """Class 6, forged page tokens on ListModels: its token is the last model name of the page before, so a token
    that cannot be a model name (negative number, 400 digits, an injection, a path, non-ASCII) is one no server
    made: INVALID_ARGUMENT, as on the other list calls."""
    for token in BAD_TOKENS[1:]:
        request = rpb.ListModelsRequest(page=page(token))
        outcome = mesh.unary(via, "/modelgrid.registry.v1.ModelRegistry/ListModels", request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (token, outcome.code.name, outcome.details)


@pytest.fixture(scope="module")
def job(mesh, digits_spec) -> str:
    """A job that stays pending (no agent runs here)."""
    submitted = mesh.unary(
        "direct", "/modelgrid.trainer.v1.Trainer/SubmitJob", tpb.SubmitJobRequest(spec=digits_spec())
    )
    return tpb.Job.FromString(submitted.assert_code(grpc.StatusCode.OK).replies[0]).id


@pytest.mark.parametrize("via", VIAS)
def test_watch_cursors_no_server_made_are_invalid_argument(mesh, via, unique, job):
    """Class 6, forged cursors: WatchEvents and WatchJob with a cursor that is no stream id end INVALID_ARGUMENT
    at once (rather than reading Redis from a made-up position)."""
    name = unique("cursor")
    mesh.registry_client().ensure_model(name)
    for cursor in ("bogus", "-1", "1-x", "9" * 400, "$", ">"):
        for method, request in [
            (
                "/modelgrid.registry.v1.ModelRegistry/WatchEvents",
                rpb.WatchEventsRequest(cursor=cursor, model_name=name),
            ),
            ("/modelgrid.trainer.v1.Trainer/WatchJob", tpb.WatchJobRequest(id=job, cursor=cursor)),
        ]:
            outcome = mesh.streamed(via, method, [request], kind="unary_stream", timeout=10)
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (
                method,
                cursor,
                outcome.code.name,
                outcome.details,
            )
            assert outcome.seconds < END_WITHIN_S


def test_every_service_stays_healthy(mesh):
    """Class 6, the aftermath: every service still SERVING, and a real prediction through the gateway works."""
    mesh.assert_serving("registry", "predictor", "trainer", "gateway")
    x = np.ones((1, 4), np.float32)
    request = ppb.PredictRequest(model=common_pb2.ModelRef(name=mesh.model), inputs={"x": array_to_tensor(x)})
    mesh.unary("gateway", "/modelgrid.predictor.v1.Predictor/Predict", request).assert_code(grpc.StatusCode.OK)
    mesh.unary("gateway", "/modelgrid.gateway.v1.GatewayAdmin/GetRoutes", gpb.GetRoutesRequest()).assert_code(
        grpc.StatusCode.OK
    )
