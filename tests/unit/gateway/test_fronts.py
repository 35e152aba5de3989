"""Both public fronts in process over the Forwarder and real backends: the native gRPC front (a grpc.aio server on
port 0 called over a real channel) and the gRPC-Web front (its ASGI app called through httpx)."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio

from modelgrid.common.v1 import common_pb2
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.gateway import grpcweb
from services.gateway.admin import GatewayAdminServicer, LocalAdminCalls
from services.gateway.auth import Authorizer
from services.gateway.native import ProxyHandler
from services.gateway.web import GrpcWebApp
from services.kit.redis_client import create_redis

pytestmark = pytest.mark.asyncio(loop_scope="session")

METADATA = "/modelgrid.predictor.v1.Predictor/GetModelMetadata"
PREDICT_STREAM = "/modelgrid.predictor.v1.Predictor/PredictStream"
ADMIN_KEY = "unit-admin-key"


@pytest_asyncio.fixture(loop_scope="session")
async def authorizer(redis_server, unique) -> AsyncIterator[Authorizer]:
    """Auth on, with a bootstrap admin key, over the session's Redis."""
    redis = create_redis(redis_server.url)
    yield Authorizer(
        redis, enabled=True, admin_key=ADMIN_KEY, default_rate=100, burst_seconds=1, prefix=f"{unique('gw')}:"
    )
    await redis.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def native(new_gateway, authorizer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the native front (auth on) served in this process on port 0."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ProxyHandler(new_gateway().forwarder, authorizer),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await server.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def web(new_gateway, authorizer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gRPC-Web front's ASGI app (auth on)."""
    gateway = new_gateway()
    app = GrpcWebApp(gateway.settings, gateway.forwarder, authorizer)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
        yield client


ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


def model_request(model: str) -> bytes:
    return pb.GetModelMetadataRequest(name=model).SerializeToString()


async def test_native_unary_call_with_headers_trailers_and_errors(mesh, native):
    call = native.unary_unary(METADATA)(model_request("m1"), metadata=(*ADMIN, ("x-custom", "v")), timeout=10)
    assert await call == model_request("m1")
    assert dict(await call.initial_metadata())["x-replica"] == "a"
    assert dict(await call.trailing_metadata())["x-trailer"] == "a"
    seen = dict(mesh.backends["a"].metadata)
    assert (seen["x-custom"], seen["x-modelgrid-client"]) == ("v", "admin")
    assert "authorization" not in seen

    failing = native.unary_unary(METADATA)(b"", metadata=(*ADMIN, ("x-test-action", "not-found")), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await failing
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such thing")
    assert "x-trailer" in dict(err.value.trailing_metadata())

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await native.unary_unary(METADATA)(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await native.unary_unary("/acme.Nope/Call")(b"", metadata=ADMIN, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_native_stream_and_cancellation(mesh, native):
    request = pb.PredictStreamRequest(id="1", request=pb.PredictRequest(model=common_pb2.ModelRef(name="m1")))
    messages = [request.SerializeToString()] * 3
    call = native.stream_stream(PREDICT_STREAM)(iter(messages), metadata=ADMIN, timeout=10)
    assert [m async for m in call] == messages
    assert dict(await call.initial_metadata())["x-replica"] == "a"
    assert dict(await call.trailing_metadata())["x-trailer"] == "a"

    sleeping = native.unary_unary(METADATA)(
        model_request("m1"), metadata=(*ADMIN, ("x-test-action", "sleep")), timeout=30
    )
    await asyncio.wait_for(mesh.backends["a"].started.wait(), 5)
    sleeping.cancel()
    await asyncio.wait_for(mesh.backends["a"].cancelled.wait(), 2)  # the caller left: the upstream call ended


async def _web_call(client: httpx.AsyncClient, method: str, body: bytes, **headers: str):
    response = await client.post(
        method, content=body, headers={"content-type": "application/grpc-web+proto", **headers}, timeout=10
    )
    assert response.status_code == 200
    frames = grpcweb.decode_frames(response.content)
    assert frames[-1].is_trailers
    return response, [f.payload for f in frames[:-1]], grpcweb.decode_trailers(frames[-1].payload)


async def test_web_unary_call_and_errors(mesh, web):
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    body = grpcweb.encode_message(model_request("m1"))
    response, messages, trailers = await _web_call(web, METADATA, body, **auth)
    assert messages == [model_request("m1")]
    assert trailers["grpc-status"] == "0" and trailers["x-trailer"] == "a"
    assert response.headers["x-replica"] == "a"

    _, messages, trailers = await _web_call(web, METADATA, body, **auth, **{"x-test-action": "not-found"})
    assert messages == []
    assert (trailers["grpc-status"], trailers["grpc-message"]) == ("5", "no such thing")

    _, _, trailers = await _web_call(web, METADATA, body)
    assert trailers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])

    # a unary method sent two messages: refused at the gateway, it takes exactly one
    response, messages, trailers = await _web_call(web, METADATA, body + body, **auth)
    assert messages == [] and "x-replica" not in response.headers
    assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "exactly one request message" in trailers["grpc-message"]


async def test_web_answers_the_gateways_own_api_with_its_key_checks(new_gateway, authorizer):
    """GatewayAdmin on the web port (the console's keys and routes pages) is the native port's servicer: the same
    key checks and scopes; a malformed call is INVALID_ARGUMENT."""
    gateway = new_gateway()
    admin = LocalAdminCalls(GatewayAdminServicer(authorizer, gateway.backends, gateway.settings.routes))
    app = GrpcWebApp(gateway.settings, gateway.forwarder, authorizer, admin)
    list_keys = "/modelgrid.gateway.v1.GatewayAdmin/ListApiKeys"
    body = grpcweb.encode_message(gpb.ListApiKeysRequest().SerializeToString())
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as web:
        created = gpb.CreateApiKeyRequest(name="web-read", scopes=[gpb.SCOPE_READ])
        create = grpcweb.encode_message(created.SerializeToString())
        _, messages, trailers = await _web_call(web, "/modelgrid.gateway.v1.GatewayAdmin/CreateApiKey", create, **auth)
        assert trailers["grpc-status"] == "0"
        read_key = gpb.CreateApiKeyResponse.FromString(messages[0]).secret

        _, messages, trailers = await _web_call(web, list_keys, body, **auth)
        assert trailers["grpc-status"] == "0"
        assert "web-read" in [key.name for key in gpb.ListApiKeysResponse.FromString(messages[0]).keys]

        for headers, status in [
            ({}, grpc.StatusCode.UNAUTHENTICATED),
            ({"authorization": f"Bearer {read_key}"}, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            _, messages, trailers = await _web_call(web, list_keys, body, **headers)
            assert messages == [] and trailers["grpc-status"] == str(status.value[0])

        for malformed in (b"", body + body, grpcweb.encode_message(b"\xff\xff")):
            _, messages, trailers = await _web_call(web, list_keys, malformed, **auth)
            assert messages == [] and trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])


async def test_web_stream(mesh, web):
    request = pb.PredictStreamRequest(id="1", request=pb.PredictRequest(model=common_pb2.ModelRef(name="m1")))
    body = grpcweb.encode_message(request.SerializeToString()) * 2
    response, messages, trailers = await _web_call(web, PREDICT_STREAM, body, authorization=f"Bearer {ADMIN_KEY}")
    assert messages == [request.SerializeToString()] * 2
    assert trailers["grpc-status"] == "0"
    assert response.headers["x-replica"] == "a"
