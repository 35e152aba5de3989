"""The gateway's routing decisions as pure logic (no servers): which service a method goes to and whether it is
unary, which metadata passes, which model a call is for (the instance tag it prefers) and the canary redirect,
and the fewest-in-flight choice among instances."""

from collections import Counter

import grpc
import pytest

import modelgrid.predictor.v1.predictor_pb2 as pb
from modelgrid.common.v1 import common_pb2
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import model_of, redirect_to_alias
from services.gateway.proxy import CLIENT_HEADER, Forwarder
from services.gateway.settings import GatewaySettings
from services.kit.channels import Member, fewest_in_flight
from services.kit.consul import Instance


@pytest.fixture
def forwarder() -> Forwarder:
    settings = GatewaySettings(
        consul_enabled=False, routes={"modelgrid.": "everything", "modelgrid.registry.v1.": "registry"}
    )
    return Forwarder(settings, backends=None, canary=None, metrics=GatewayMetrics())  # routing needs neither


def test_the_longest_prefix_routes_and_the_descriptor_says_unary(forwarder):
    route = forwarder.route("/modelgrid.registry.v1.ModelRegistry/GetModel")
    assert route is not None and route.service == "registry"  # not "everything": the longer prefix wins
    assert forwarder.route("/modelgrid.predictor.v1.Predictor/Predict").service == "everything"
    assert forwarder.route("/modelgrid.predictor.v1.Predictor/Predict").unary
    assert not forwarder.route("/modelgrid.predictor.v1.Predictor/PredictStream").unary
    assert not forwarder.route("/modelgrid.predictor.v1.Predictor/Unknown").unary  # streaming works for any shape
    assert forwarder.route("/acme.Other/Call") is None


def test_hop_and_credential_headers_stop_at_the_gateway_and_the_identity_is_set(forwarder):
    metadata = [
        ("authorization", "Bearer k"),
        ("x-api-key", "k"),
        ("grpc-timeout", "1S"),
        (":authority", "gw"),
        ("X-Custom", "1"),
        ("x-modelgrid-client", "forged"),
        ("trace-bin", b"\x00"),
    ]
    assert forwarder.request_metadata(metadata, "alice") == [
        ("X-Custom", "1"),
        ("trace-bin", b"\x00"),
        (CLIENT_HEADER, "alice"),
    ]
    assert forwarder.passable([("content-type", "application/grpc"), ("x-replica", "a")]) == (("x-replica", "a"),)


def test_the_model_of_each_protocol_and_its_alias():
    predict = pb.PredictRequest(model=common_pb2.ModelRef(name="iris", alias="production")).SerializeToString()
    assert model_of("/modelgrid.predictor.v1.Predictor/Predict", predict) == ("iris", "production")
    stream = pb.PredictStreamRequest(request=pb.PredictRequest(model=common_pb2.ModelRef(name="iris")))
    assert model_of("/modelgrid.predictor.v1.Predictor/PredictStream", stream.SerializeToString()) == ("iris", "")
    assert model_of("/modelgrid.registry.v1.ModelRegistry/GetModel", predict) == ("", "")  # no model routing
    assert model_of("/modelgrid.predictor.v1.Predictor/Predict", b"\xff\xff") == ("", "")  # malformed: no model
    assert model_of("/modelgrid.predictor.v1.Predictor/Predict", None) == ("", "")


def test_only_predictions_are_redirected_to_the_canary():
    method = "/modelgrid.predictor.v1.Predictor/Predict"
    request = pb.PredictRequest(model=common_pb2.ModelRef(name="iris", alias="production"), output_filter=["y"])
    redirected = pb.PredictRequest.FromString(redirect_to_alias(method, request.SerializeToString(), "canary"))
    assert (redirected.model.name, redirected.model.alias, list(redirected.output_filter)) == ("iris", "canary", ["y"])
    metadata_call = "/modelgrid.predictor.v1.Predictor/GetModelMetadata"
    assert redirect_to_alias(metadata_call, b"abc", "canary") == b"abc"


async def test_the_instance_with_the_fewest_calls_in_flight_is_picked_and_ties_are_spread():
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never connected
    members = [Member(Instance(f"i{n}", "svc", "127.0.0.1", 9000 + n), channel) for n in range(3)]
    members[0].in_flight, members[1].in_flight, members[2].in_flight = 2, 1, 1
    pick = fewest_in_flight()
    picked = Counter(pick(members).instance.id for _ in range(200))
    assert set(picked) == {"i1", "i2"}
    members[2].in_flight = 0
    assert {pick(members).instance.id for _ in range(20)} == {"i2"}
    await channel.close()
