"""The Forwarder in process, over real gRPC backends found in the session's real Consul: unary calls (response,
headers, trailers, failures), retries of UNAVAILABLE on another instance with ejection, the idempotency rule,
deadlines, cancellation, streams, and the canary redirect."""

import asyncio
import time

import grpc
import pytest

from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.gateway.metrics import UNKNOWN_METHOD
from services.gateway.proxy import End, Headers, Reply

pytestmark = pytest.mark.asyncio(loop_scope="session")

PREDICT = "/modelgrid.predictor.v1.Predictor/Predict"
METADATA = "/modelgrid.predictor.v1.Predictor/GetModelMetadata"
PREDICT_STREAM = "/modelgrid.predictor.v1.Predictor/PredictStream"
ECHO_STREAM = "/modelgrid.predictor.v1.Predictor/NoSuchStreamInTheProto"  # unknown shape: the streaming path


def metadata_request(model: str) -> bytes:
    return pb.GetModelMetadataRequest(name=model).SerializeToString()


def caller(gateway, *pairs: tuple[str, str], client: str = "pytest") -> list[tuple[str, str]]:
    """What a front hands the forwarder: the caller's metadata with hop headers dropped and the identity added."""
    return gateway.forwarder.request_metadata([("authorization", "Bearer x"), *pairs], client)


async def test_a_unary_call_passes_with_its_headers_and_trailers(mesh, new_gateway):
    gateway = new_gateway()
    request = metadata_request("any-model")
    reply = await gateway.forwarder.unary(METADATA, caller(gateway, ("x-custom", "1")), 10.0, request)
    assert isinstance(reply, Reply)
    assert reply.response == request
    replica = dict(reply.headers)["x-replica"]
    assert dict(reply.trailers) == {"x-trailer": replica}
    seen = dict(mesh.backends[replica].metadata)
    assert seen["x-custom"] == "1" and seen["x-modelgrid-client"] == "pytest"
    assert "authorization" not in seen  # credentials end at the gateway
    assert gateway.count("modelgrid_gateway_requests_total", service=mesh.service, method=METADATA, code="OK") == 1


async def test_a_failed_call_ends_with_its_status_details_and_trailers(mesh, new_gateway):
    gateway = new_gateway()
    end = await gateway.forwarder.unary(
        METADATA, caller(gateway, ("x-test-action", "not-found")), 10.0, metadata_request("x")
    )
    assert isinstance(end, End)
    assert (end.code, end.details) == (grpc.StatusCode.NOT_FOUND, "no such thing")
    assert dict(end.trailers)["x-trailer"] in mesh.backends
    assert gateway.count("modelgrid_gateway_requests_total", service=mesh.service, method=METADATA, code="NOT_FOUND")


async def test_calls_for_a_model_go_to_the_instance_serving_it(mesh, new_gateway):
    gateway = new_gateway()
    for _ in range(5):
        reply = await gateway.forwarder.unary(METADATA, caller(gateway), 10.0, metadata_request("m1"))
        assert dict(reply.headers)["x-replica"] == "a"  # tagged model=m1 in Consul


async def test_unavailable_is_retried_on_another_instance_and_the_instance_is_ejected(mesh, new_gateway):
    gateway = new_gateway()
    metadata = caller(gateway, ("x-test-action", "unavailable-on:a"))
    reply = await gateway.forwarder.unary(METADATA, metadata, 10.0, metadata_request("m1"))  # "a" is tried first
    assert isinstance(reply, Reply) and dict(reply.headers)["x-replica"] == "b"
    assert (mesh.backends["a"].calls, mesh.backends["b"].calls) == (1, 1)
    pool = await gateway.backends.get(mesh.service)
    ejected = {m.instance.id.rsplit("-", 1)[1]: m.ejected_until > time.monotonic() for m in pool.members.values()}
    assert ejected == {"a": True, "b": False}
    assert gateway.count("modelgrid_gateway_retries_total", service=mesh.service) == 1
    assert gateway.count("modelgrid_gateway_ejections_total", service=mesh.service) == 1
    # while ejected, "a" is left out of rotation (a call for its model still goes there: no other serves it)
    for _ in range(5):
        reply = await gateway.forwarder.unary(METADATA, caller(gateway), 10.0, metadata_request("other-model"))
        assert dict(reply.headers)["x-replica"] == "b"
    assert mesh.backends["a"].calls == 1


async def test_a_call_that_changes_state_is_retried_only_with_an_idempotency_key(mesh, new_gateway):
    gateway = new_gateway(non_idempotent_methods=[METADATA])
    metadata = caller(gateway, ("x-test-action", "unavailable-on:a"))
    end = await gateway.forwarder.unary(METADATA, metadata, 10.0, metadata_request("m1"))
    assert isinstance(end, End) and end.code == grpc.StatusCode.UNAVAILABLE
    assert "a is down" in end.details
    gateway = new_gateway(non_idempotent_methods=[METADATA])
    metadata = caller(gateway, ("x-test-action", "unavailable-on:a"), ("idempotency-key", "k1"))
    reply = await gateway.forwarder.unary(METADATA, metadata, 10.0, metadata_request("m1"))
    assert isinstance(reply, Reply) and dict(reply.headers)["x-replica"] == "b"


async def test_retries_stop_when_every_instance_failed(mesh, new_gateway):
    gateway = new_gateway(retry_attempts=3)
    end = await gateway.forwarder.unary(METADATA, caller(gateway, ("x-test-action", "unavailable")), 10.0, b"")
    assert isinstance(end, End) and end.code == grpc.StatusCode.UNAVAILABLE
    assert (mesh.backends["a"].calls, mesh.backends["b"].calls) == (1, 1)  # each tried once
    assert gateway.count("modelgrid_gateway_ejections_total", service=mesh.service) == 2


async def test_the_deadline_travels_upstream(mesh, new_gateway):
    gateway = new_gateway()
    started = time.monotonic()
    end = await gateway.forwarder.unary(METADATA, caller(gateway, ("x-test-action", "sleep")), 0.3, b"")
    assert isinstance(end, End) and end.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 < time.monotonic() - started < 3
    assert gateway.count(
        "modelgrid_gateway_requests_total", service=mesh.service, method=METADATA, code="DEADLINE_EXCEEDED"
    )


async def test_a_cancelled_call_is_cancelled_upstream_at_once(mesh, new_gateway):
    gateway = new_gateway()
    call = asyncio.create_task(
        gateway.forwarder.unary(METADATA, caller(gateway, ("x-test-action", "sleep")), None, metadata_request("m1"))
    )
    await asyncio.wait_for(mesh.backends["a"].started.wait(), 5)
    pool = await gateway.backends.get(mesh.service)
    assert sum(m.in_flight for m in pool.members.values()) == 1
    call.cancel()
    await asyncio.wait_for(mesh.backends["a"].cancelled.wait(), 2)
    assert sum(m.in_flight for m in pool.members.values()) == 0
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_unrouted_methods_and_services_without_instances(mesh, new_gateway):
    gateway = new_gateway()
    end = await gateway.forwarder.unary("/acme.Nope/Call", [], None, b"")
    assert isinstance(end, End) and end.code == grpc.StatusCode.UNIMPLEMENTED
    end = await gateway.forwarder.unary("/modelgrid.nowhere.v1.Svc/Call", [], None, b"")
    assert isinstance(end, End) and end.code == grpc.StatusCode.UNAVAILABLE
    assert "no healthy instance" in end.details


async def _requests(*messages: bytes):
    for message in messages:
        yield message


async def test_a_stream_passes_frame_by_frame(mesh, new_gateway):
    gateway = new_gateway()
    frames = [f async for f in gateway.forwarder.stream(ECHO_STREAM, caller(gateway), 10.0, _requests(b"1", b"22"))]
    assert isinstance(frames[0], Headers) and frames[1:3] == [b"1", b"22"]
    end = frames[3]
    assert isinstance(end, End) and end.code == grpc.StatusCode.OK
    assert dict(end.trailers)["x-trailer"] == dict(frames[0].metadata)["x-replica"]
    # a method no descriptor describes is counted, under the one label of unknown methods (bounded series)
    assert gateway.count("modelgrid_gateway_requests_total", service=mesh.service, method=UNKNOWN_METHOD, code="OK")
    assert not gateway.count("modelgrid_gateway_requests_total", service=mesh.service, method=ECHO_STREAM, code="OK")


def stream_request(model: str, id_: str) -> bytes:
    request = pb.PredictRequest(model=common_pb2.ModelRef(name=model))
    return pb.PredictStreamRequest(id=id_, request=request).SerializeToString()


async def test_a_stream_that_failed_before_any_answer_is_replayed_elsewhere(mesh, new_gateway):
    gateway = new_gateway()
    messages = [stream_request("m1", "1"), stream_request("m1", "2")]
    metadata = caller(gateway, ("x-test-action", "unavailable-on:a"))
    frames = [f async for f in gateway.forwarder.stream(PREDICT_STREAM, metadata, 10.0, _requests(*messages))]
    assert (mesh.backends["a"].calls, mesh.backends["b"].calls) == (1, 1)  # the model's instance first
    assert dict(frames[0].metadata)["x-replica"] == "b"
    assert frames[1:3] == messages  # the whole request stream, replayed on the other instance
    assert frames[3].code == grpc.StatusCode.OK
    assert gateway.count("modelgrid_gateway_retries_total", service=mesh.service) == 1


async def test_closing_a_stream_cancels_it_upstream(mesh, new_gateway):
    gateway = new_gateway()
    metadata = caller(gateway, ("x-test-action", "sleep"))
    frames = gateway.forwarder.stream(PREDICT_STREAM, metadata, None, _requests(stream_request("m1", "1")))
    waiting = asyncio.create_task(anext(frames))
    await asyncio.wait_for(mesh.backends["a"].started.wait(), 5)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await frames.aclose()
    await asyncio.wait_for(mesh.backends["a"].cancelled.wait(), 2)
    pool = await gateway.backends.get(mesh.service)
    assert sum(m.in_flight for m in pool.members.values()) == 0


async def test_the_canary_takes_its_share_of_the_stable_alias(mesh, new_gateway):
    gateway = new_gateway()
    request = pb.PredictRequest(model=common_pb2.ModelRef(name="m1", alias="production")).SerializeToString()
    gateway.canary.weights["m1"] = 1.0
    reply = await gateway.forwarder.unary(PREDICT, caller(gateway), 10.0, request)
    assert pb.PredictRequest.FromString(reply.response).model.alias == "canary"
    assert dict(reply.headers)["x-replica"] == "a"
    gateway.canary.weights.clear()
    reply = await gateway.forwarder.unary(PREDICT, caller(gateway), 10.0, request)
    assert pb.PredictRequest.FromString(reply.response).model.alias == "production"
    assert gateway.count("modelgrid_gateway_canary_redirects_total", model="m1") == 1
