"""Streaming calls through both fronts in process, over the real test backends (conftest): the open streams one
caller may hold (counted across the native and the gRPC-Web front, given back however a call ends), a method that
takes one request message sent none or two (INVALID_ARGUMENT at once, not a call that hangs), and a backend that
refuses a stream while its requests are still being sent (its status, never grpc.aio's INTERNAL)."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
import pytest_asyncio

import modelgrid.registry.v1.registry_pb2  # noqa: F401 - the descriptors that make WatchEvents server streaming
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.gateway import grpcweb
from services.gateway.auth import Authorizer, Scope
from services.gateway.native import ProxyHandler
from services.gateway.proxy import End, Headers
from services.gateway.streams import SETTING
from services.gateway.web import start_web_front
from services.kit.redis_client import create_redis

pytestmark = pytest.mark.asyncio(loop_scope="session")

PREDICT_STREAM = "/modelgrid.predictor.v1.Predictor/PredictStream"
METADATA = "/modelgrid.predictor.v1.Predictor/GetModelMetadata"
WATCH = "/modelgrid.registry.v1.ModelRegistry/WatchEvents"  # server streaming: one request message
ADMIN_KEY = "streams-admin-key"
LIMIT = 2
STREAM_REQUEST = pb.PredictStreamRequest(
    id="1", request=pb.PredictRequest(model=common_pb2.ModelRef(name="m1"))
).SerializeToString()


@dataclass
class Fronts:
    """Both fronts of one forwarder and one authorizer (auth on, LIMIT open streams per caller)."""

    authorizer: Authorizer
    channel: grpc.aio.Channel
    web: httpx.AsyncClient
    forwarder: object

    def held(self, owner: str) -> int:
        return self.authorizer.streams.held(owner)


async def _fronts(new_gateway, redis_server, unique, *, enabled: bool) -> AsyncIterator[Fronts]:
    redis = create_redis(redis_server.url)
    authorizer = Authorizer(
        redis,
        enabled=enabled,
        admin_key=ADMIN_KEY if enabled else "",
        default_rate=1000,
        burst_seconds=1,
        prefix=f"{unique('streams')}:",
        max_streams=LIMIT,
    )
    gateway = new_gateway(
        routes={"modelgrid.registry.v1.": "backends"},
        host="127.0.0.1",
        advertise_host="127.0.0.1",
        web_port=0,
        shutdown_grace_seconds=1,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ProxyHandler(gateway.forwarder, authorizer),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    web_port, stop_web = await start_web_front(gateway.settings, gateway.forwarder, authorizer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=20) as web:
        yield Fronts(authorizer, channel, web, gateway.forwarder)
    await channel.close()
    await stop_web()
    await server.stop(0)
    await redis.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def fronts(new_gateway, redis_server, unique) -> AsyncIterator[Fronts]:
    async for made in _fronts(new_gateway, redis_server, unique, enabled=True):
        yield made


@pytest_asyncio.fixture(loop_scope="session")
async def open_fronts(new_gateway, redis_server, unique) -> AsyncIterator[Fronts]:
    """The same with auth off: callers are told apart by address."""
    async for made in _fronts(new_gateway, redis_server, unique, enabled=False):
        yield made


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


def bearer(secret: str, *pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"), *pairs)


def native_stream(fronts: Fronts, metadata, timeout: float = 30) -> grpc.aio.StreamStreamCall:
    return fronts.channel.stream_stream(PREDICT_STREAM)(iter([STREAM_REQUEST]), metadata=metadata, timeout=timeout)


async def web_call(fronts: Fronts, method: str, body: bytes, metadata) -> tuple[list[bytes], dict[str, str]]:
    headers = {"content-type": "application/grpc-web+proto", **dict(metadata)}
    response = await fronts.web.post(method, content=body, headers=headers)
    assert response.status_code == 200, response.text
    frames = grpcweb.decode_frames(response.content)
    return [f.payload for f in frames[:-1]], grpcweb.decode_trailers(frames[-1].payload)


async def refused(call: grpc.aio.StreamStreamCall) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    return err.value.details()


# -- open streams per caller ----------------------------------------------------------------------------------


async def test_one_key_holds_at_most_the_limit_across_both_fronts_and_others_are_not_starved(mesh, fronts):
    key, secret = await fronts.authorizer.create_key("dashboard", [Scope.PREDICT], 0)
    owner = f"key:{key.id}"
    sleeping = bearer(secret, ("x-test-action", "sleep"))
    native = native_stream(fronts, sleeping)
    await until(lambda: fronts.held(owner) == 1)
    web = asyncio.create_task(web_call(fronts, PREDICT_STREAM, grpcweb.encode_message(STREAM_REQUEST), sleeping))
    await until(lambda: fronts.held(owner) == LIMIT)

    details = await refused(native_stream(fronts, bearer(secret)))
    assert "'dashboard'" in details and f"has {LIMIT} streaming calls open" in details and SETTING in details
    assert secret not in details
    _, trailers = await web_call(fronts, PREDICT_STREAM, grpcweb.encode_message(STREAM_REQUEST), bearer(secret))
    assert trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert SETTING in trailers["grpc-message"]
    # unary calls of the key, and streams of another caller (the admin key), still pass
    reply = fronts.channel.unary_unary(METADATA)(b"", metadata=bearer(secret), timeout=10)
    assert await reply == b""
    other = native_stream(fronts, bearer(ADMIN_KEY))
    assert [m async for m in other] == [STREAM_REQUEST]
    assert fronts.held(owner) == LIMIT  # the refused calls took no slot

    native.cancel()  # the client cancels: its slot comes back, and the upstream call ends
    await until(lambda: fronts.held(owner) == 1)
    web.cancel()  # the browser goes away
    await until(lambda: fronts.held(owner) == 0)
    await asyncio.wait_for(mesh.backends["a"].cancelled.wait(), 5)


async def test_a_slot_comes_back_however_the_stream_ends(mesh, fronts):
    key, secret = await fronts.authorizer.create_key("worker", [Scope.PREDICT], 0)
    owner = f"key:{key.id}"
    for _ in range(3 * LIMIT):  # more calls than slots: every way of ending gives its slot back
        done = native_stream(fronts, bearer(secret))
        assert [m async for m in done] == [STREAM_REQUEST]
        failed = native_stream(fronts, bearer(secret, ("x-test-action", "not-found")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await failed.read()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        late = native_stream(fronts, bearer(secret, ("x-test-action", "sleep")), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await late.read()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _, trailers = await web_call(fronts, PREDICT_STREAM, grpcweb.encode_message(STREAM_REQUEST), bearer(secret))
        assert trailers["grpc-status"] == "0"
        _, trailers = await web_call(fronts, WATCH, grpcweb.encode_message(b"") * 2, bearer(secret))
        assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    await until(lambda: fronts.held(owner) == 0)
    assert fronts.authorizer.streams.total == 0


async def test_with_auth_off_a_caller_is_its_address(mesh, open_fronts):
    sleeping = (("x-test-action", "sleep"), ("x-modelgrid-client", "one"))
    calls = [native_stream(open_fronts, sleeping) for _ in range(LIMIT)]
    await until(lambda: open_fronts.held("peer:127.0.0.1") == LIMIT)
    # another name in x-modelgrid-client is the same caller
    details = await refused(native_stream(open_fronts, (("x-modelgrid-client", "two"),)))
    assert "caller 127.0.0.1" in details and SETTING in details
    for call in calls:
        call.cancel()
    await until(lambda: open_fronts.held("peer:127.0.0.1") == 0)


# -- methods that take one request message --------------------------------------------------------------------


async def _messages(*messages: bytes) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


async def _frames(forwarder, method: str, requests: AsyncIterator[bytes], *pairs: tuple[str, str]) -> list:
    metadata = forwarder.request_metadata(list(pairs), "pytest")
    return [frame async for frame in forwarder.stream(method, metadata, 10.0, requests)]


async def test_a_server_streaming_method_takes_exactly_one_request(mesh, new_gateway):
    forwarder = new_gateway(routes={"modelgrid.registry.v1.": "backends"}).forwarder
    for requests, sent in (((), "none"), ((b"a", b"b"), "more than one"), ((b"a", b"b", b"c"), "more than one")):
        frames = await _frames(forwarder, WATCH, _messages(*requests))
        expected = f"{WATCH} takes exactly one request message; this call sent {sent}"
        assert frames == [End(grpc.StatusCode.INVALID_ARGUMENT, expected)]
    assert sum(b.calls for b in mesh.backends.values()) == 0  # refused at the gateway
    frames = await _frames(forwarder, WATCH, _messages(b"one"))
    assert type(frames[0]) is Headers and frames[1:-1] == [b"one"] and frames[-1].code == grpc.StatusCode.OK


async def test_both_fronts_refuse_two_requests_to_a_one_request_method_at_once(mesh, fronts):
    started = time.monotonic()
    for method in (WATCH, METADATA):
        messages, trailers = await web_call(fronts, method, grpcweb.encode_message(b"") * 2, bearer(ADMIN_KEY))
        assert messages == [] and trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert "exactly one request message" in trailers["grpc-message"]
    call = fronts.channel.stream_stream(WATCH)(iter([b"", b""]), metadata=bearer(ADMIN_KEY), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < 5
    assert sum(b.calls for b in mesh.backends.values()) == 0


# -- a backend that refuses a stream while its requests are still being sent ----------------------------------


async def test_a_refused_upload_ends_with_the_backends_status_not_grpcs_internal(mesh, new_gateway):
    """grpc.aio replaces the status with INTERNAL "Internal error from Core" when a write fails because the
    backend has just ended the call: without BackendStatus, a good share of these calls ended so."""
    forwarder = new_gateway().forwarder
    chunks = [b"x" * 70_000] * 4
    codes = []
    for _ in range(60):
        frames = await _frames(forwarder, PREDICT_STREAM, _messages(*chunks), ("x-test-action", "refuse-first"))
        codes.append((frames[-1].code, frames[-1].details))
    assert set(codes) == {(grpc.StatusCode.INVALID_ARGUMENT, "the first message is wrong")}
