"""The KServe v2 REST front in process: the web port's ASGI app called through httpx, with a real Authorizer (the
session's Redis) and a Forwarder over the real echo backends of conftest.py (routed as the `inference.` API). A
backend echoes the request message, so a ModelMetadata call comes back as a ModelMetadataResponse naming the model
and version it was asked about (fields 1 and 2 of both). Infer answers against a real predictor are the
integration tier's (tests/integration/test_oip_rest.py)."""

# tritonclient's copy of the OIP messages: the project's own `inference` must not load in a test process that also
# uses tritonclient; it gives the Forwarder the descriptors that make the OIP methods unary.
from tritonclient.grpc import service_pb2  # noqa: F401  # isort: skip

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from services.gateway.auth import Authorizer, Scope
from services.gateway.web import GrpcWebApp
from services.kit.redis_client import create_redis

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN_KEY = "unit-oip-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'


@pytest_asyncio.fixture(loop_scope="session")
async def authorizer(redis_server, unique) -> AsyncIterator[Authorizer]:
    redis = create_redis(redis_server.url)
    yield Authorizer(
        redis, enabled=True, admin_key=ADMIN_KEY, default_rate=100, burst_seconds=1, prefix=f"{unique('oip')}:"
    )
    await redis.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def rest(new_gateway, authorizer, mesh) -> AsyncIterator:
    """`client, gateway = await rest(**settings)`: an httpx client of the web app, OIP routed to the backends."""
    clients: list[httpx.AsyncClient] = []

    async def make(routes: dict[str, str] | None = None, **settings):
        gateway = new_gateway(routes=routes or {"inference.": "backends"}, **settings)
        app = GrpcWebApp(gateway.settings, gateway.forwarder, authorizer)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
        clients.append(client)
        return client, gateway

    yield make
    for client in clients:
        await client.aclose()


async def test_a_call_reaches_the_backend_serving_the_model_as_the_caller_without_credentials(rest, mesh):
    client, _ = await rest()
    response = await client.get("/v2/models/m1/versions/3", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "m1", "versions": ["3"], "platform": "", "inputs": [], "outputs": []}
    assert (mesh.backends["a"].calls, mesh.backends["b"].calls) == (1, 0)  # the one tagged model=m1
    metadata = dict(mesh.backends["a"].metadata)
    assert metadata["x-modelgrid-client"] == "admin" and "authorization" not in metadata


async def test_keys_scopes_and_rates_are_the_authorizers(rest, authorizer, mesh):
    client, _ = await rest()
    _, reader = await authorizer.create_key("reader", [Scope.READ], rate_limit=1)
    for headers, status in [({}, 401), ({"x-api-key": "bad.key"}, 401), ({"authorization": f"Bearer {reader}"}, 403)]:
        response = await client.post("/v2/models/m1/infer", content=BODY, headers=headers)
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
    assert mesh.backends["a"].calls + mesh.backends["b"].calls == 0
    assert (await client.get("/v2/models/m1", headers={"x-api-key": reader})).status_code == 200
    limited = await client.get("/v2/models/m1", headers={"x-api-key": reader})  # one call a second
    assert limited.status_code == 429 and "retry in" in limited.json()["error"]
    assert mesh.backends["a"].calls == 1


@pytest.mark.parametrize(
    "method,path,content,headers,status,expected",
    [
        ("GET", "/v2/models/m1/stats", None, {}, 404, "no KServe v2 route"),
        ("GET", "/v2/models/m1/infer", None, {}, 405, "takes POST"),
        ("POST", "/v2/models/m1", b"{}", {}, 405, "takes GET, HEAD"),
        ("POST", "/v2/models/m1/infer", b"{nope", {}, 400, "not valid JSON"),
        ("POST", "/v2/models/m1/infer", BODY, {"content-encoding": "br"}, 400, "Content-Encoding 'br'"),
        ("POST", "/v2/models/m1/infer", BODY, {"content-encoding": "gzip"}, 400, "not valid gzip data"),
        ("POST", "/v2/models/m1/infer", b"[" + b" " * 2048 + b"]", {}, 413, "WEB_MAX_BODY_BYTES"),
    ],
)
async def test_bad_requests_are_answered_without_a_backend(
    rest, mesh, method, path, content, headers, status, expected
):
    client, _ = await rest(web_max_body_bytes=2048)
    response = await client.request(method, path, content=content, headers={**ADMIN, **headers})
    assert response.status_code == status, response.text
    assert expected in response.json()["error"]
    assert mesh.backends["a"].calls + mesh.backends["b"].calls == 0


async def test_no_predictor_is_503_and_a_slow_one_504_cancelled_upstream(rest, mesh):
    client, _ = await rest(routes={"inference.": f"{mesh.service}-none"})
    response = await client.get("/v2/health/ready", headers=ADMIN)
    assert response.status_code == 503 and "no healthy instance" in response.json()["error"]
    client, _ = await rest(oip_rest_timeout_seconds=0.3)
    response = await client.get("/v2/models/m1", headers={**ADMIN, "x-test-action": "sleep"})
    assert response.status_code == 504, response.text
    await asyncio.wait_for(mesh.backends["a"].cancelled.wait(), 10)


async def test_a_forbidden_origin_is_refused_and_an_allowed_host_is_needed(rest):
    client, _ = await rest()
    refused = await client.get("/v2/health/live", headers={**ADMIN, "origin": "http://evil.example"})
    assert refused.status_code == 403
    rebound = await client.get("/v2/health/live", headers={**ADMIN, "host": "evil.example"})
    assert rebound.status_code == 421


async def test_a_body_that_stalls_is_ended_by_the_body_timeout(rest, mesh):
    client, _ = await rest(web_body_timeout_seconds=0.2)

    async def stalling():
        yield b'{"inputs": ['
        await asyncio.sleep(5)
        yield b"]}"

    started = asyncio.get_running_loop().time()
    response = await client.post("/v2/models/m1/infer", content=stalling(), headers=ADMIN)
    assert response.status_code == 408 and "stalled" in response.json()["error"]
    assert asyncio.get_running_loop().time() - started < 3
    assert mesh.backends["a"].calls + mesh.backends["b"].calls == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "\\ud800", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        b'{"inputs": [{"name": "x\\udfff", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
    ],
)
async def test_a_lone_surrogate_in_the_json_is_a_clear_400(rest, mesh, body):
    client, _ = await rest()
    response = await client.post("/v2/models/m1/infer", content=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert "not valid Unicode" in response.json()["error"]
    assert mesh.backends["a"].calls + mesh.backends["b"].calls == 0
