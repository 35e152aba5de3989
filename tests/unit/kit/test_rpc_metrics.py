"""The RPC metrics the error mapping interceptor records (one label scheme for every service), on a real grpc.aio
server over a real channel, and the pure pieces of kit.metrics."""

import asyncio
import contextlib
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from modelgrid.client import errors
from modelgrid.registry.v1 import registry_pb2  # noqa: F401 - describes the methods below
from services.kit.interceptors import ErrorMappingInterceptor
from services.kit.metrics import UNKNOWN_METHOD, GaugeCollector, RpcMetrics, snapshot, status_name
from services.predictor.metrics import grpc_status_name

GET_MODEL = "/modelgrid.registry.v1.ModelRegistry/GetModel"
WATCH = "/modelgrid.registry.v1.ModelRegistry/WatchEvents"
HANDLED = "modelgrid_rpc_server_handled_total"


class _Handlers(grpc.GenericRpcHandler):
    """GetModel answers b"" with b"ok", b"missing" with NotFound, b"boom" with an unexpected error; WatchEvents
    sends one message and then waits until the client goes away."""

    def __init__(self) -> None:
        self.watching = asyncio.Event()

    def service(self, handler_call_details):
        if handler_call_details.method == GET_MODEL:
            return grpc.unary_unary_rpc_method_handler(self._get)
        if handler_call_details.method == WATCH:
            return grpc.unary_stream_rpc_method_handler(self._watch)
        return None

    async def _get(self, request: bytes, context) -> bytes:
        if request == b"missing":
            raise errors.NotFound("no such model")
        if request == b"boom":
            raise RuntimeError("a bug")
        return b"ok"

    async def _watch(self, request: bytes, context):
        yield b"event"
        self.watching.set()
        await asyncio.sleep(3600)


@contextlib.asynccontextmanager
async def _served():
    registry = CollectorRegistry()
    handlers = _Handlers()
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(metrics=RpcMetrics(registry, "registry"))])
    server.add_generic_rpc_handlers((handlers,))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield registry, channel, handlers
    finally:
        await channel.close()
        await server.stop(0)


def _handled(registry: CollectorRegistry, method: str, code: str) -> float:
    return registry.get_sample_value(HANDLED, {"service": "registry", "method": method, "code": code}) or 0.0


async def _code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_each_call_is_counted_once_under_its_grpc_status_name():
    async with _served() as (registry, channel, _):
        get = channel.unary_unary(GET_MODEL)
        assert await _code_of(get(b"")) == grpc.StatusCode.OK
        assert await _code_of(get(b"")) == grpc.StatusCode.OK
        assert await _code_of(get(b"missing")) == grpc.StatusCode.NOT_FOUND
        assert await _code_of(get(b"boom")) == grpc.StatusCode.INTERNAL
        assert _handled(registry, GET_MODEL, "OK") == 2
        assert _handled(registry, GET_MODEL, "NOT_FOUND") == 1
        assert _handled(registry, GET_MODEL, "INTERNAL") == 1
        labels = {"service": "registry", "method": GET_MODEL}
        assert registry.get_sample_value("modelgrid_rpc_server_handling_seconds_count", labels) == 4
        assert registry.get_sample_value("modelgrid_rpc_server_in_flight", {"service": "registry"}) == 0


async def test_health_checks_are_left_out_and_unknown_methods_share_one_label():
    async with _served() as (registry, channel, _):
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (await check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        for path in ("/modelgrid.registry.v1.ModelRegistry/NoSuchMethod", "/made.Up/Path"):
            assert await _code_of(channel.unary_unary(path)(b"")) == grpc.StatusCode.UNIMPLEMENTED
        assert _handled(registry, UNKNOWN_METHOD, "UNIMPLEMENTED") == 2
        methods = {s.labels["method"] for m in registry.collect() for s in m.samples if "method" in s.labels}
        assert methods == {UNKNOWN_METHOD}, methods  # no health series, no invented paths


async def test_a_stream_is_in_flight_while_open_and_cancelled_when_the_client_leaves():
    async with _served() as (registry, channel, handlers):
        in_flight = {"service": "registry"}
        call = channel.unary_stream(WATCH)(b"")
        assert await call.read() == b"event"
        await handlers.watching.wait()
        assert registry.get_sample_value("modelgrid_rpc_server_in_flight", in_flight) == 1
        call.cancel()
        deadline = time.monotonic() + 10
        while _handled(registry, WATCH, "CANCELLED") == 0:
            assert time.monotonic() < deadline, "the cancelled stream was never counted"
            await asyncio.sleep(0.02)
        assert registry.get_sample_value("modelgrid_rpc_server_in_flight", in_flight) == 0


def test_status_names_of_codes_and_their_integer_values():
    assert status_name(None) == "OK"
    assert status_name(grpc.StatusCode.NOT_FOUND) == "NOT_FOUND"
    assert status_name(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]) == "RESOURCE_EXHAUSTED"
    assert status_name(999) == "UNKNOWN"


@pytest.mark.parametrize(
    ("reported", "label"),
    [
        ("OK", "OK"),
        ("NotFound", "NOT_FOUND"),
        ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
        ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
        ("Cancelled", "CANCELLED"),
        ("Unavailable", "UNAVAILABLE"),
        ("UNAVAILABLE", "UNAVAILABLE"),
        ("SomethingElse", "UNKNOWN"),
    ],
)
def test_the_predictors_codes_are_grpc_status_names(reported, label):
    assert grpc_status_name(reported) == label


def test_a_failing_gauge_reader_leaves_only_its_gauges_out():
    registry = CollectorRegistry()

    def broken():
        raise OSError("gone")
        yield  # pragma: no cover

    registry.register(GaugeCollector(broken))
    registry.register(GaugeCollector(lambda: [("modelgrid_test_things", "Things", ("kind",), [(("a",), 3)])]))
    assert registry.get_sample_value("modelgrid_test_things", {"kind": "a"}) == 3


def test_snapshot_retries_a_read_that_raced_with_the_event_loop():
    attempts = []

    def read():
        attempts.append(1)
        if len(attempts) < 2:
            raise RuntimeError("dictionary changed size during iteration")
        return [1]

    assert snapshot(read) == [1]
    assert len(attempts) == 2
