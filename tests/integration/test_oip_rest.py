"""KServe v2 REST (the Open Inference Protocol over HTTP/JSON) on the gateway's web port, end to end: a real gateway
(API keys on) in front of a real predictor and registry, found in a Consul agent of this module's own, with the
session's Redis. tritonclient.http unchanged (JSON and binary tensors, metadata, readiness), raw HTTP/1.1 and h2c
requests with httpx (health, metadata, JSON infer, the binary tensor data extension), keys and scopes, rate limits,
canary routing, and the errors: unknown model 404, bad input 400, too big 413. Answers are compared with what
TensorFlow computes in this process for the same SavedModel."""

import json
import struct
import time
import uuid
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.kit.localinfra import ConsulAgent, free_port

pytestmark = pytest.mark.slow

ADMIN_KEY = "oip-rest-admin-key"
X = np.array([[0.5, -1.0, 2.0, 0.1], [1.0, 2.0, 3.0, 4.0], [-0.3, 0.0, 0.7, -2.0]], dtype=np.float32)
MAX_BODY = 64 * 1024
"""WEB_MAX_BODY_BYTES of the gateway here: small, so that a body over it costs nothing."""
MAX_JSON_VALUES = 1000
"""OIP_REST_MAX_JSON_VALUES of the gateway here."""
TRANSPORTS = {"http1": {"http1": True, "http2": False}, "h2c": {"http1": False, "http2": True}}


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, tf_reference):
    """One registry, one predictor serving every registry model (AUTO_LOAD) and one gateway with its web port, on a
    Consul agent of this module's own (the gateway sees only this predictor); model versions 1 (production) and 2
    (canary) with different weights; a PREDICT key, a READ key."""
    tmp = tmp_path_factory.mktemp("oip-rest")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        model = unique("oip")
        client.ensure_model(model)
        references = {}
        for seed in (1, 2):
            path = build_saved_model(tmp / f"m{seed}", seed=seed)
            client.push_savedmodel(model, path)
            references[seed] = tf_reference(path)
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="canary", version=2))
        web_port = free_port()
        gateway_settings = {
            "WEB_PORT": str(web_port),
            "AUTH_ENABLED": "true",
            "ADMIN_KEY": ADMIN_KEY,
            "REDIS_KEY_PREFIX": f"mg:test-oip:{uuid.uuid4().hex[:8]}:",
            "WEB_MAX_BODY_BYTES": str(MAX_BODY),
            "OIP_REST_MAX_JSON_VALUES": str(MAX_JSON_VALUES),
        }
        with launch.together():
            predictor = launch.predictor(consul.http_url, redis_server.url, tmp / "p", [], AUTO_LOAD="true")
            gateway = launch.gateway(consul.http_url, redis_server.url, tmp, **gateway_settings)
        gateway_channel = grpc.insecure_channel(gateway.target)
        admin = gateway_pb2_grpc.GatewayAdminStub(gateway_channel)

        def key(name: str, *scopes: int, rate: float = 0) -> str:
            request = gpb.CreateApiKeyRequest(name=name, scopes=list(scopes), rate_limit=rate)
            return admin.CreateApiKey(request, metadata=(("authorization", f"Bearer {ADMIN_KEY}"),), timeout=10).secret

        ns = SimpleNamespace(
            model=model,
            client=client,
            references=references,
            url=f"127.0.0.1:{web_port}",
            base=f"http://127.0.0.1:{web_port}",
            predict=key("oip-predict", gpb.SCOPE_PREDICT),
            read=key("oip-read", gpb.SCOPE_READ),
            key=key,
        )
        try:
            _wait_ready(ns)
            yield ns
        finally:
            gateway_channel.close()
            channel.close()
            gateway.stop()
            predictor.stop()
            registry.stop()


def _auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def _wait_ready(ns, timeout: float = 90.0) -> None:
    """Until the gateway routes to the predictor and both aliases are served there."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=ns.base, headers=_auth(ns.read), timeout=10) as http:
        while True:
            codes = [
                http.get(f"/v2/models/{ns.model}/versions/{v}/ready").status_code for v in ("production", "canary")
            ]
            if codes == [200, 200]:
                return
            assert time.monotonic() < deadline, f"the model never became ready through the gateway: {codes}"
            time.sleep(0.3)


@pytest.fixture
def triton_client(mesh):
    client = triton.InferenceServerClient(mesh.url, network_timeout=30.0)
    yield client
    client.close()


# -- tritonclient.http, unchanged -------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_matches_tensorflow(mesh, triton_client, binary):
    x = triton.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X, binary_data=binary)
    result = triton_client.infer(
        mesh.model,
        [x],
        model_version="1",
        outputs=[triton.InferRequestedOutput("y", binary_data=binary)],
        request_id="req-42",
        headers=_auth(mesh.predict),
    )
    np.testing.assert_allclose(result.as_numpy("y"), mesh.references[1](X), rtol=1e-6)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (mesh.model, "1", "req-42")
    assert ("data" in response["outputs"][0]) is not binary


def test_tritonclient_infer_without_outputs_gets_them_all_in_binary(mesh, triton_client):
    x = triton.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    result = triton_client.infer(mesh.model, [x], model_version="production", headers=_auth(mesh.predict))
    np.testing.assert_allclose(result.as_numpy("y"), mesh.references[1](X), rtol=1e-6)
    assert result.get_output("y")["parameters"]["binary_data_size"] == X.shape[0] * 3 * 4


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(mesh, triton_client, compression):
    x = triton.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    result = triton_client.infer(
        mesh.model,
        [x],
        model_version="1",
        headers=_auth(mesh.predict),
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,  # asked for, not done: the answer says it is not compressed
    )
    np.testing.assert_allclose(result.as_numpy("y"), mesh.references[1](X), rtol=1e-6)


def test_tritonclient_health_metadata_and_readiness(mesh, triton_client):
    headers = _auth(mesh.read)
    assert triton_client.is_server_live(headers=headers)
    assert triton_client.is_server_ready(headers=headers)
    server = triton_client.get_server_metadata(headers=headers)
    assert server["name"] == "modelgrid-predictor" and "binary_tensor_data" in server["extensions"]
    metadata = triton_client.get_model_metadata(mesh.model, headers=headers)
    assert metadata["name"] == mesh.model and set(metadata["versions"]) == {"1", "2"}
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert triton_client.is_model_ready(mesh.model, headers=headers)
    assert triton_client.is_model_ready(mesh.model, "2", headers=headers)
    assert not triton_client.is_model_ready(mesh.model, "7", headers=headers)
    assert not triton_client.is_model_ready("no-such-model", headers=headers)
    with pytest.raises(InferenceServerException) as err:
        triton_client.get_model_metadata("no-such-model", headers=headers)
    assert err.value.status() == "404"
    assert not triton_client.is_server_live()  # no key: 401


def test_tritonclient_errors_carry_the_http_status(mesh, triton_client):
    x = triton.InferInput("x", [1, 4], "FP64")
    x.set_data_from_numpy(X[:1].astype(np.float64))
    with pytest.raises(InferenceServerException) as err:
        triton_client.infer(mesh.model, [x], headers=_auth(mesh.predict))
    assert err.value.status() == "400" and "float32" in err.value.message()
    x = triton.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X[:1])
    with pytest.raises(InferenceServerException) as err:
        triton_client.infer(mesh.model, [x], headers=_auth(mesh.read))
    assert err.value.status() == "403" and "PREDICT" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton_client.infer(mesh.model, [x], model_version="99", headers=_auth(mesh.predict))
    assert err.value.status() == "404"


# -- raw HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=list(TRANSPORTS))
def http(mesh, request):
    with httpx.Client(base_url=mesh.base, timeout=30, **TRANSPORTS[request.param]) as client:
        yield client


def test_health_and_metadata(mesh, http):
    headers = _auth(mesh.read)
    for path, expected in [("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})]:
        response = http.get(path, headers=headers)
        assert (response.status_code, response.json()) == (200, expected)
    server = http.get("/v2", headers=headers).json()
    assert server["name"] == "modelgrid-predictor" and "binary_tensor_data" in server["extensions"]
    metadata = http.get(f"/v2/models/{mesh.model}/versions/production", headers=headers)
    assert metadata.status_code == 200 and metadata.headers["content-type"] == "application/json"
    assert metadata.json()["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    ready = http.get(f"/v2/models/{mesh.model}/ready", headers=headers)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert http.get(f"/v2/models/{mesh.model}/versions/9/ready", headers=headers).status_code == 503


def test_json_infer_with_nested_or_flat_data(mesh, http):
    for data in (X.tolist(), X.reshape(-1).tolist()):
        body = {"id": "j1", "inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP32", "data": data}]}
        response = http.post(f"/v2/models/{mesh.model}/versions/2/infer", json=body, headers=_auth(mesh.predict))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in response.headers
        answer = response.json()
        assert (answer["model_name"], answer["model_version"], answer["id"]) == (mesh.model, "2", "j1")
        [y] = answer["outputs"]
        assert (y["name"], y["datatype"], y["shape"]) == ("y", "FP32", [3, 3])
        np.testing.assert_allclose(np.array(y["data"], np.float32).reshape(3, 3), mesh.references[2](X), rtol=1e-6)


def test_binary_tensor_data_extension(mesh, http):
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(X.shape), "datatype": "FP32", "parameters": {"binary_data_size": X.nbytes}}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = http.post(
        f"/v2/models/{mesh.model}/infer",
        content=header + X.tobytes(),
        headers={**_auth(mesh.predict), "inference-header-content-length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:length])
    [y] = answer["outputs"]
    assert y["parameters"]["binary_data_size"] == len(response.content) - length == 3 * 3 * 4
    values = np.frombuffer(response.content[length:], np.float32).reshape(y["shape"])
    np.testing.assert_allclose(values, mesh.references[2](X), rtol=1e-6)  # the default version: the newest
    assert answer["model_version"] == "2"


def test_keys_and_scopes_as_on_the_grpc_ports(mesh, http):
    secret_marker = "caller-data-7f3e"
    body = {"id": secret_marker, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    infer = f"/v2/models/{mesh.model}/infer"
    for headers, status in [
        ({}, 401),
        (_auth("nope.nope"), 401),
        ({"x-api-key": "bad"}, 401),
        (_auth(mesh.read), 403),
    ]:
        response = http.post(infer, json=body, headers=headers)
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"} and secret_marker not in response.text
    for path in ("/v2/health/live", "/v2", f"/v2/models/{mesh.model}"):
        assert http.get(path).status_code == 401
    assert http.post(infer, json=body, headers={"x-api-key": mesh.predict}).status_code == 200


def test_rate_limit_answers_429_with_the_wait(mesh, http):
    slow = mesh.key("oip-slow", gpb.SCOPE_READ, rate=1)
    codes = [http.get("/v2/health/live", headers=_auth(slow)) for _ in range(3)]
    assert [r.status_code for r in codes][0] == 200
    limited = [r for r in codes if r.status_code == 429]
    assert limited and "retry in" in limited[0].json()["error"]


def test_unknown_model_version_and_route(mesh, http):
    headers = _auth(mesh.predict)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    for path in ("/v2/models/no-such-model/infer", f"/v2/models/{mesh.model}/versions/99/infer"):
        response = http.post(path, json=body, headers=headers)
        assert response.status_code == 404 and "error" in response.json(), response.text
    assert http.get("/v2/models/no-such-model", headers=headers).status_code == 404
    assert http.get("/v2/repository/index", headers=headers).status_code == 404
    wrong_method = http.get(f"/v2/models/{mesh.model}/infer", headers=headers)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "content,expected",
    [
        (b'{"inputs": [', "not valid JSON"),
        (b'{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3]}]}', "do not match shape"),
        (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}', "shape"),
        (b'{"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}', "'z'"),
        (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", 2, 3, 4]}]}', "numbers"),
        (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}', "float32"),
    ],
    ids=["malformed", "count", "signature-shape", "unknown-input", "not-numbers", "wrong-datatype"],
)
def test_bad_input_is_400_with_a_clear_message(mesh, http, content, expected):
    response = http.post(f"/v2/models/{mesh.model}/infer", content=content, headers=_auth(mesh.predict))
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


def test_too_large_bodies_are_413_and_the_connection_goes_on(mesh, http):
    headers = _auth(mesh.predict)
    path = f"/v2/models/{mesh.model}/infer"
    too_big = http.post(path, content=b"{" + b" " * MAX_BODY + b"}", headers=headers)
    assert too_big.status_code == 413 and "MODELGRID_GATEWAY_WEB_MAX_BODY_BYTES" in too_big.json()["error"]
    values = MAX_JSON_VALUES + 1
    many = {"inputs": [{"name": "x", "shape": [values // 4 + 1, 4], "datatype": "FP32", "data": [0.0] * values}]}
    response = http.post(path, json=many, headers=headers)
    assert response.status_code == 413 and "MAX_JSON_VALUES" in response.json()["error"]
    binary = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}
    header = json.dumps(binary).encode()
    bad_length = http.post(
        path, content=header + X[:1].tobytes(), headers={**headers, "inference-header-content-length": "99999"}
    )
    assert bad_length.status_code == 400 and "Inference-Header-Content-Length" in bad_length.json()["error"]
    ok = http.post(
        path, content=header + X[:1].tobytes(), headers={**headers, "inference-header-content-length": str(len(header))}
    )
    assert ok.status_code == 200, ok.text


def test_bytes_tensors_reach_the_predictor_checked(mesh, http):
    """The model takes FP32: a BYTES tensor (JSON strings, or length-prefixed binary) is parsed here and refused by
    the predictor's signature check, naming what it expects."""
    strings = [{"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "bé"]}]
    response = http.post(f"/v2/models/{mesh.model}/infer", json={"inputs": strings}, headers=_auth(mesh.predict))
    assert response.status_code == 400 and "float32" in response.json()["error"]
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"a", b"b"))
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    response = http.post(
        f"/v2/models/{mesh.model}/infer",
        content=header + raw,
        headers={**_auth(mesh.predict), "inference-header-content-length": str(len(header))},
    )
    assert response.status_code == 400 and "float32" in response.json()["error"]


def test_canary_weight_applies_to_rest_calls_of_the_stable_alias(mesh, http):
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    path = f"/v2/models/{mesh.model}/versions/production/infer"

    def versions(calls: int) -> set[str]:
        return {http.post(path, json=body, headers=_auth(mesh.predict)).json()["model_version"] for _ in range(calls)}

    assert versions(5) == {"1"}
    tag = "modelgrid.canary-weight"
    mesh.client.stub.UpdateModel(rpb.UpdateModelRequest(name=mesh.model, set_tags={tag: "1"}))
    try:
        deadline = time.monotonic() + 10
        while versions(1) != {"2"}:  # the gateway follows the registry's events
            assert time.monotonic() < deadline, "the canary weight never applied"
            time.sleep(0.1)
        assert versions(5) == {"2"}
    finally:
        mesh.client.stub.UpdateModel(rpb.UpdateModelRequest(name=mesh.model, set_tags={tag: "0"}))
    deadline = time.monotonic() + 10
    while versions(1) != {"1"}:
        assert time.monotonic() < deadline, "the rollback never applied"
        time.sleep(0.1)
