"""KServe v2 REST bodies <-> OIP messages (services/gateway/oip_json.py), and the REST front's routes and statuses,
without servers: what tritonclient.http sends is parsed into the ModelInferRequest a predictor gets, answers are
written as tritonclient.http reads them, and bad bodies get a clear error before anything big is allocated."""

# tritonclient's copy of the OIP messages first: the project's own (`inference`) must not load in a test process
# that also uses tritonclient (the same proto file twice in one descriptor pool); oip_json finds these by name.
from tritonclient.grpc import service_pb2 as oip  # isort: skip

import json
import struct

import grpc
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http import InferResult

from modelgrid.client.errors import InvalidArgument
from services.gateway import oip_json
from services.gateway.oip_rest import HTTP_STATUS, match

LIMITS = oip_json.JsonLimits(max_json_bytes=64 * 1024, max_json_values=10_000, max_request_bytes=1024 * 1024)
X = np.array([[0.5, -1.0, 2.0, 0.1], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def triton_body(inputs, outputs=None, **options) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) exactly as tritonclient.http builds them."""
    from tritonclient.http._utils import _get_inference_request

    arguments = dict(request_id="", sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None)
    arguments.update(options)
    body, json_size = _get_inference_request(inputs=inputs, outputs=outputs, custom_parameters=None, **arguments)
    return body, None if json_size is None else str(json_size)


def triton_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def parse(document: dict, binary: bytes = b"", limits=LIMITS) -> oip_json.InferCall:
    header = json.dumps(document).encode()
    length = str(len(header)) if binary else None
    return oip_json.parse_infer(header + binary, length, "digits", "production", limits)


def raw_array(call: oip_json.InferCall, index: int, dtype) -> np.ndarray:
    tensor = call.request.inputs[index]
    return np.frombuffer(call.request.raw_input_contents[index], dtype=dtype).reshape(list(tensor.shape))


# -- requests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_what_tritonclient_sends_becomes_the_predictors_request(binary):
    words = np.array([b"alpha", "béta".encode(), b""], dtype=object)
    body, length = triton_body(
        [triton_input("x", X, "FP32", binary), triton_input("w", words, "BYTES", binary)],
        [triton.InferRequestedOutput("y", binary_data=not binary)],
        request_id="req-7",
        priority=2,
    )
    assert (length is not None) == binary
    call = oip_json.parse_infer(body, length, "digits", "3", LIMITS)
    request = oip.ModelInferRequest.FromString(call.request.SerializeToString())
    assert (request.model_name, request.model_version, request.id) == ("digits", "3", "req-7")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("x", "FP32", [2, 4]), ("w", "BYTES", [3])]
    assert np.array_equal(np.frombuffer(request.raw_input_contents[0], np.float32).reshape(2, 4), X)
    strings = b"".join(struct.pack("<I", len(w)) + w for w in words)
    assert request.raw_input_contents[1] == strings
    assert request.parameters["priority"].int64_param == 2
    assert "binary_data_output" not in request.parameters  # a REST-only choice, not passed on
    assert [o.name for o in request.outputs] == ["y"]
    assert call.binary("y") is (not binary)


def test_flat_and_nested_data_mean_the_same_tensor():
    flat = parse({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()}]})
    nested = parse({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.tolist()}]})
    assert flat.request.raw_input_contents[0] == nested.request.raw_input_contents[0] == X.tobytes()


@pytest.mark.parametrize(
    "datatype,data,dtype",
    [
        ("BOOL", [True, False, True], np.bool_),
        ("INT8", [-128, 0, 127], np.int8),
        ("INT16", [-3, 0, 30000], np.int16),
        ("INT32", [-(2**31), 0, 2**31 - 1], np.int32),
        ("INT64", [-(2**63), 0, 2**63 - 1], np.int64),
        ("UINT8", [0, 1, 255], np.uint8),
        ("UINT16", [0, 1, 65535], np.uint16),
        ("UINT32", [0, 1, 2**32 - 1], np.uint32),
        ("UINT64", [0, 1, 2**64 - 1], np.uint64),
        ("FP16", [0.5, -2, 1024.0], np.float16),
        ("FP32", [0.25, 3, -1.5], np.float32),
        ("FP64", [1e300, -0.0, 7], np.float64),
    ],
)
def test_every_numeric_datatype(datatype, data, dtype):
    call = parse({"inputs": [{"name": "v", "shape": [3], "datatype": datatype, "data": data}]})
    assert raw_array(call, 0, dtype).tolist() == np.array(data, dtype=dtype).tolist()


@pytest.mark.parametrize(
    "tensor,expected",
    [
        ({"shape": [2, 4], "datatype": "FP32", "data": [1.0] * 7}, "7 values in `data` do not match shape [2, 4]"),
        ({"shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0]]}, "does not match shape [2, 2] at depth 1"),
        ({"shape": [2], "datatype": "FP32", "data": [[1.0], [2.0]]}, "deeper than shape [2]"),
        ({"shape": [3], "datatype": "FP32", "data": [1.0, "2", 3.0]}, "FP32 elements must be numbers"),
        ({"shape": [2], "datatype": "INT32", "data": [1, 2.5]}, "INT32 elements must be integers"),
        ({"shape": [1], "datatype": "UINT8", "data": [256]}, "outside the UINT8 range"),
        ({"shape": [1], "datatype": "INT64", "data": [2**64]}, "outside the INT64 range"),
        ({"shape": [2], "datatype": "BOOL", "data": [1, 0]}, "BOOL elements must be true or false"),
        ({"shape": [1], "datatype": "BYTES", "data": [5]}, "BYTES elements in JSON must be strings"),
        ({"shape": [1], "datatype": "BF16", "data": [1.0]}, "BF16 cannot be written in JSON"),
        ({"shape": [1], "datatype": "FP128", "data": [1.0]}, "unknown datatype 'FP128'"),
        ({"shape": [-1, 4], "datatype": "FP32", "data": []}, "negative dimension"),
        ({"shape": "2x4", "datatype": "FP32", "data": []}, "`shape` must be a list of integers"),
        ({"shape": [1], "datatype": "FP32"}, "has no `data`"),
        ({"shape": [1], "datatype": "FP32", "data": {"a": 1}}, "`data` must be a list"),
    ],
)
def test_bad_tensors_say_what_is_wrong(tensor, expected):
    with pytest.raises(InvalidArgument) as err:
        parse({"inputs": [{"name": "x", **tensor}]})
    assert expected in str(err.value)
    assert "input 'x'" in str(err.value)


@pytest.mark.parametrize(
    "document,expected",
    [
        ({"inputs": None}, "`inputs` must be a non-empty list"),
        ({"inputs": []}, "`inputs` must be a non-empty list"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "input #0 has no name"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "appears more than once"),
        ({"id": 7, "inputs": []}, "`id` must be a string"),
        ({"parameters": {"p": [1]}, "inputs": []}, "parameter 'p' must be"),
        ({"parameters": {"binary_data_output": "yes"}, "inputs": []}, "'binary_data_output' must be true or false"),
        ({"outputs": [{"name": "y", "parameters": {"classification": 3}}]}, "classification extension"),
        ({"outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]}, "shared memory extension"),
    ],
)
def test_bad_requests_say_what_is_wrong(document, expected):
    document.setdefault("inputs", [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}])
    with pytest.raises(InvalidArgument) as err:
        parse(document)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "body,expected",
    [
        (b"", "not valid JSON: Expecting value (line 1, column 1)"),
        (b'{"inputs": [', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "nests too deeply"),
    ],
)
def test_malformed_json_is_a_clear_error_that_repeats_nothing_of_the_body(body, expected):
    limits = oip_json.JsonLimits(max_json_bytes=64 * 1024, max_json_values=100_000, max_request_bytes=1 << 20)
    with pytest.raises(InvalidArgument) as err:
        oip_json.parse_infer(body, None, "m", "", limits)
    assert expected in str(err.value)


def test_binary_inputs_are_sliced_in_input_order_and_must_add_up():
    a, b = np.arange(6, dtype=np.int32), np.array([1.5, 2.5], dtype=np.float64)
    tensors = [
        {"name": "a", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": a.nbytes}},
        {"name": "j", "shape": [1], "datatype": "FP32", "data": [9.0]},
        {"name": "b", "shape": [2], "datatype": "FP64", "parameters": {"binary_data_size": b.nbytes}},
    ]
    call = parse({"inputs": tensors}, a.tobytes() + b.tobytes())
    assert raw_array(call, 0, np.int32).tolist() == a.reshape(2, 3).tolist()
    assert raw_array(call, 1, np.float32).tolist() == [9.0]
    assert raw_array(call, 2, np.float64).tolist() == b.tolist()
    for binary, expected in [
        (a.tobytes() + b.tobytes() + b"x", "1 bytes of binary data after the JSON belong to no input"),
        (a.tobytes(), "runs past the end of the binary data"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            parse({"inputs": tensors}, binary)
        assert expected in str(err.value)
    wrong = [{"name": "a", "shape": [2, 2], "datatype": "INT32", "parameters": {"binary_data_size": a.nbytes}}]
    with pytest.raises(InvalidArgument, match=r"24 bytes of binary data do not match shape \[2, 2\] of INT32"):
        parse({"inputs": wrong}, a.tobytes())
    both = [{**tensors[0], "data": [1] * 6}]
    with pytest.raises(InvalidArgument, match="both `data` and parameters.binary_data_size"):
        parse({"inputs": both}, a.tobytes())


@pytest.mark.parametrize("length", ["abc", "-1", "999999", " 12x"])
def test_a_bad_header_length_is_refused(length):
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length"):
        oip_json.parse_infer(b'{"inputs": []}', length, "m", "", LIMITS)


def test_json_size_and_value_count_are_bounded_before_parsing():
    limits = oip_json.JsonLimits(max_json_bytes=2048, max_json_values=100, max_request_bytes=1 << 20)
    many = {"inputs": [{"name": "x", "shape": [200], "datatype": "FP32", "data": [0] * 200}]}
    with pytest.raises(oip_json.PayloadTooLarge, match="holds up to 2.. values, more than the limit of 100"):
        parse(many, limits=limits)
    big = {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a" * 4096]}]}
    with pytest.raises(oip_json.PayloadTooLarge, match="more than the limit of 2048"):
        parse(big, limits=limits)
    small = oip_json.JsonLimits(max_json_bytes=1 << 20, max_json_values=1 << 20, max_request_bytes=1024)
    call = parse({"inputs": [{"name": "x", "shape": [1024], "datatype": "FP32", "data": [0.0] * 1024}]}, limits=small)
    with pytest.raises(oip_json.PayloadTooLarge, match="more than a call to a predictor carries"):
        oip_json.check_forwardable(call.request, small)


def test_compressed_bodies_inflate_within_the_limit():
    import gzip
    import zlib

    body = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}).encode()
    assert oip_json.decompress(gzip.compress(body), "gzip", 1024) == body
    assert oip_json.decompress(zlib.compress(body), "Deflate", 1024) == body  # what tritonclient.http sends
    bomb = gzip.compress(b" " * 10_000_000)  # about 10 KB that inflate to 10 MB
    with pytest.raises(oip_json.PayloadTooLarge, match="inflates to more than 4096 bytes"):
        oip_json.decompress(bomb, "gzip", 4096)
    with pytest.raises(InvalidArgument, match="ends inside its gzip data"):
        oip_json.decompress(gzip.compress(body)[:-12], "gzip", 1024)
    with pytest.raises(InvalidArgument, match="not valid deflate data"):
        oip_json.decompress(body, "deflate", 1024)
    with pytest.raises(InvalidArgument, match="Content-Encoding 'br' is not supported"):
        oip_json.decompress(body, "br", 1024)


# -- responses -------------------------------------------------------------------------------------------------


def predictor_answer() -> oip.ModelInferResponse:
    y = (X @ np.ones((4, 3), np.float32)).astype(np.float32)
    words = np.array([b"one", b"two"], dtype=object)
    response = oip.ModelInferResponse(model_name="digits", model_version="2", id="req-1")
    response.outputs.add(name="y", datatype="FP32", shape=[2, 3])
    response.raw_output_contents.append(y.tobytes())
    response.outputs.add(name="w", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(b"".join(struct.pack("<I", len(w)) + w for w in words))
    return response


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_answers_read_by_tritonclient(binary):
    response = predictor_answer()
    call = oip_json.InferCall(oip.ModelInferRequest(), {"w": not binary}, binary_default=binary)  # w: its own choice
    body, json_length = oip_json.infer_response(response, call, max_json_values=100)
    assert json_length is not None  # one of the two outputs is binary in either case

    class Response:  # what geventhttpclient hands InferResult: headers by name, a readable body
        def __init__(self):
            self._offset = 0

        def get(self, name):
            return str(json_length) if name == "Inference-Header-Content-Length" and json_length else None

        def read(self, length=-1):
            start, self._offset = self._offset, len(body) if length == -1 else self._offset + length
            return body[start : self._offset]

    result = InferResult(Response(), verbose=False)
    assert np.array_equal(
        result.as_numpy("y"), np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 3)
    )
    assert result.as_numpy("w").tolist() == (["one", "two"] if binary else [b"one", b"two"])
    document = result.get_response()
    assert (document["model_name"], document["model_version"], document["id"]) == ("digits", "2", "req-1")
    as_json = document["outputs"][0 if not binary else 1]
    assert "data" in as_json and "parameters" not in as_json


def test_answers_too_big_or_not_text_for_json_say_to_ask_for_binary():
    response = predictor_answer()
    as_json = oip_json.InferCall(oip.ModelInferRequest(), {}, binary_default=False)
    with pytest.raises(oip_json.PayloadTooLarge, match="binary_data"):
        oip_json.infer_response(response, as_json, max_json_values=5)
    response.raw_output_contents[1] = struct.pack("<I", 2) + b"\xff\xfe" + struct.pack("<I", 0)
    with pytest.raises(InvalidArgument, match="not UTF-8 text; ask for it as binary data"):
        oip_json.infer_response(response, as_json, max_json_values=100)


def test_metadata_documents():
    server = oip.ServerMetadataResponse(name="modelgrid-predictor", version="0.1.0", extensions=["model_repository"])
    assert oip_json.server_metadata(server) == {
        "name": "modelgrid-predictor",
        "version": "0.1.0",
        "extensions": ["model_repository", "binary_tensor_data"],
    }
    tensor = oip.ModelMetadataResponse.TensorMetadata
    model = oip.ModelMetadataResponse(
        name="digits",
        versions=["1", "2"],
        platform="tensorflow_savedmodel",
        inputs=[tensor(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[tensor(name="y", datatype="FP32", shape=[-1, 3])],
    )
    assert oip_json.model_metadata(model) == {
        "name": "digits",
        "versions": ["1", "2"],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }


# -- routes and statuses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,expected",
    [
        ("/v2", ("server", "", "")),
        ("/v2/", ("server", "", "")),
        ("/v2/health/live", ("live", "", "")),
        ("/v2/health/ready", ("ready", "", "")),
        ("/v2/models/digits", ("metadata", "digits", "")),
        ("/v2/models/digits/versions/3", ("metadata", "digits", "3")),
        ("/v2/models/digits/ready", ("model_ready", "digits", "")),
        ("/v2/models/digits/versions/production/ready", ("model_ready", "digits", "production")),
        ("/v2/models/digits/infer", ("infer", "digits", "")),
        ("/v2/models/digits/versions/2/infer", ("infer", "digits", "2")),
        ("/v2/models/ready", ("metadata", "ready", "")),
        ("/v2/models", None),
        ("/v2/models//infer", None),
        ("/v2/models/digits/versions//infer", None),
        ("/v2/models/digits/stats", None),
        ("/v2/repository/index", None),
        ("/v2/health", None),
    ],
)
def test_routes(path, expected):
    assert match(path) == expected


def test_every_status_a_call_can_end_with_has_an_http_status():
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert HTTP_STATUS[grpc.StatusCode.PERMISSION_DENIED] == 403
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504


def test_a_bf16_output_asked_as_json_says_to_ask_for_binary_data():
    with pytest.raises(InvalidArgument, match="binary data"):
        oip_json.values_of("BF16", [2], b"\x00\x00\x00\x00", "output 'y'", 100)
