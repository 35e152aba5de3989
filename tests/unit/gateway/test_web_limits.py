"""The web port's limits over real sockets: the gRPC-Web front served by hypercorn in this process on 127.0.0.1:0,
in front of the real test backends (conftest), spoken to with raw HTTP/1.1 (h11) and h2c (h2) connections: the Host
allow-list (DNS rebinding), same-origin CORS, body read timeouts and size limits, empty or cut bodies; and the
method label of the metrics, bounded to known methods on both fronts."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import h2.config
import h2.connection
import h2.events
import h11
import pytest
import pytest_asyncio

from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.gateway import grpcweb
from services.gateway.auth import Authorizer
from services.gateway.metrics import UNKNOWN_METHOD, GatewayMetrics, described_method
from services.gateway.native import ProxyHandler
from services.gateway.web import HostAllowList, split_host, start_web_front
from services.kit.redis_client import create_redis

on_session_loop = pytest.mark.asyncio(loop_scope="session")

METADATA = "/modelgrid.predictor.v1.Predictor/GetModelMetadata"
PREDICT_STREAM = "/modelgrid.predictor.v1.Predictor/PredictStream"
GRPC_WEB = "application/grpc-web+proto"
BODY_TIMEOUT = 1.0
MAX_BODY = 64 * 1024
MAX_MESSAGE = 16 * 1024
LISTED_ORIGIN = "http://console.example:3000"


def code(status: grpc.StatusCode) -> str:
    return str(status.value[0])


# -- the allow-list as logic ----------------------------------------------------------------------------------


def test_host_values_are_parsed_strictly():
    assert split_host("LocalHost:8081") == ("localhost", 8081)
    assert split_host("example.com.") == ("example.com", None)
    assert split_host("[0:0:0:0:0:0:0:1]:80") == ("[::1]", 80)
    assert split_host("::1") == ("[::1]", None)  # a bare address: allow-list entries only
    for bad in ("", "evil.example:http", "a b", "user@localhost", "[::1", "[nope]:1", "host:70000", "x/y"):
        assert split_host(bad) is None, bad


def test_the_allow_list_takes_any_port_unless_one_is_given():
    hosts = HostAllowList(["localhost", "127.0.0.1", "[::1]", "pinned.example:9999", "auto", "0.0.0.0"])
    for allowed in ("localhost", "localhost:8081", "LOCALHOST:1", "127.0.0.1:5", "[::1]:8081", "pinned.example:9999"):
        assert hosts.allows(allowed), allowed
    refused = ("evil.example", "evil.example:8081", "127.0.0.1.evil.example", "localhost.evil.example", "::1")
    for host in (*refused, "pinned.example", "pinned.example:80", "0.0.0.0:8081", "", None, "localhost:x"):
        assert not hosts.allows(host), host
    assert HostAllowList(["*"]).allows("anything.example")
    with pytest.raises(ValueError, match="web_allowed_hosts"):
        HostAllowList(["not a host"])


# -- a web port on a real socket ------------------------------------------------------------------------------


@dataclass
class WebPort:
    port: int
    metrics: GatewayMetrics
    forwarder: object

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest_asyncio.fixture(loop_scope="session")
async def authorizer(redis_server) -> AsyncIterator[Authorizer]:
    redis = create_redis(redis_server.url)
    yield Authorizer(redis, enabled=False, admin_key="", default_rate=100, burst_seconds=1)
    await redis.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def web(new_gateway, authorizer) -> AsyncIterator[WebPort]:
    """The web front (auth off) with lowered limits, listening on 127.0.0.1 on a free port."""
    gateway = new_gateway(
        host="127.0.0.1",
        advertise_host="127.0.0.1",
        web_port=0,
        web_allowed_hosts=["localhost", "[::1]", "console.example", "pinned.example:9999"],
        cors_origins=[LISTED_ORIGIN],
        web_body_timeout_seconds=BODY_TIMEOUT,
        web_max_body_bytes=MAX_BODY,
        max_receive_message_bytes=MAX_MESSAGE,
        shutdown_grace_seconds=1,
    )
    port, stop = await start_web_front(gateway.settings, gateway.forwarder, authorizer)
    yield WebPort(port, gateway.metrics, gateway.forwarder)
    await stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float
    closed: bool
    """The server closed the connection after the answer."""

    @property
    def trailers(self) -> dict[str, str]:
        frames = grpcweb.decode_frames(self.body)
        assert frames and frames[-1].is_trailers, self.body
        return grpcweb.decode_trailers(frames[-1].payload)


async def http1(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    declared: int | None = None,
    version: str = "1.1",
    timeout: float = 10.0,
) -> Answer:
    """One request on a new HTTP/1 connection. `declared`: a Content-Length larger than the body sent, which then
    stalls (the connection stays open, nothing more is sent, and `closed` says whether the server closed it after
    its answer); the answer is awaited at most `timeout`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = h11.Connection(h11.CLIENT)
    length = len(body) if declared is None else declared
    headers = [*headers, ("content-length", str(length))]
    if declared is None:
        headers.append(("connection", "close"))
    if version == "1.0":  # h11 sends 1.1 only (with a Host): the raw request instead
        head = [f"{method} {path} HTTP/1.0", *(f"{k}: {v}" for k, v in headers), "", ""]
        writer.write("\r\n".join(head).encode() + body)
    else:
        request = h11.Request(method=method, target=path, headers=headers)
        writer.write(client.send(request) + (client.send(h11.Data(data=body)) if body else b""))
        if declared is None:
            writer.write(client.send(h11.EndOfMessage()))
    await writer.drain()
    started = time.monotonic()
    response, data = None, b""
    try:
        async with asyncio.timeout(timeout):
            if version == "1.0":
                raw = await reader.read()
                head, _, data = raw.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                found = dict(line.lower().split(": ", 1) for line in lines[1:])
                return Answer(status, found, data, time.monotonic() - started, True)
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            seconds = time.monotonic() - started
        try:
            closed = await asyncio.wait_for(reader.read(), 3) == b""
        except TimeoutError:
            closed = False
    finally:
        writer.close()
    assert response is not None
    found = {k.decode().lower(): v.decode() for k, v in response.headers}
    return Answer(response.status_code, found, data, seconds, closed)


def grpc_web_headers(host: str, **extra: str) -> list[tuple[str, str]]:
    return [("host", host), ("content-type", GRPC_WEB), *extra.items()]


def message(model: str = "m1") -> bytes:
    return grpcweb.encode_message(pb.GetModelMetadataRequest(name=model).SerializeToString())


@on_session_loop
async def test_a_host_not_allowed_is_refused_before_anything_else(web, mesh):
    mesh.reset()
    forged = ["evil.example", f"evil.example:{web.port}", "127.0.0.1.evil.example", "pinned.example", "0.0.0.0"]
    for host in forged:
        for method, path, headers, body in (
            ("GET", "/healthz", [("host", host)], b""),
            ("GET", "/", [("host", host)], b""),
            ("OPTIONS", METADATA, [("host", host), ("origin", f"http://{host}")], b""),
            ("POST", METADATA, grpc_web_headers(host, origin=f"http://{host}"), message()),
        ):
            answer = await http1(web.port, method, path, headers, body)
            assert answer.status == 421, (host, method, path)
            assert b"WEB_ALLOWED_HOSTS" in answer.body and answer.headers["content-type"].startswith("text/plain")
            assert not any(k.startswith("access-control-") for k in answer.headers)
    assert sum(b.calls for b in mesh.backends.values()) == 0, "no refused call reached a backend"
    # no Host at all (HTTP/1.0), or two of them
    assert (await http1(web.port, "GET", "/healthz", [], version="1.0")).status == 421
    two = [("host", web.host), ("host", "evil.example")]
    assert (await http1(web.port, "GET", "/healthz", two, version="1.0")).status in (400, 421)  # h11: 400

    allowed = [web.host, f"localhost:{web.port}", "LOCALHOST", f"[::1]:{web.port}", "console.example:1234"]
    for host in [*allowed, "pinned.example:9999", "127.0.0.1:1"]:  # 127.0.0.1: the gateway's own address
        answer = await http1(web.port, "GET", "/healthz", [("host", host)])
        assert (answer.status, answer.body) == (200, b"ok\n"), host


@on_session_loop
async def test_dns_rebinding_origin_equal_to_the_forged_host_is_refused(web, mesh):
    """A page on evil.example, resolved to 127.0.0.1: the browser sends Host and Origin of evil.example, which
    match each other; the gateway answers neither the preflight nor the call."""
    mesh.reset()
    evil = f"evil.example:{web.port}"
    preflight = [("host", evil), ("origin", f"http://{evil}"), ("access-control-request-method", "POST")]
    assert (await http1(web.port, "OPTIONS", METADATA, preflight)).status == 421
    call = await http1(web.port, "POST", METADATA, grpc_web_headers(evil, origin=f"http://{evil}"), message())
    assert call.status == 421 and "access-control-allow-origin" not in call.headers
    assert mesh.backends["a"].calls == 0

    # an allowed Host with a foreign Origin: no same-origin call
    foreign = await http1(
        web.port, "POST", METADATA, grpc_web_headers(web.host, origin="http://evil.example"), message()
    )
    assert foreign.status == 403 and "access-control-allow-origin" not in foreign.headers
    # the same origin, on an allowed host: answered, with CORS headers
    for host in (web.host, f"localhost:{web.port}"):
        same = await http1(web.port, "POST", METADATA, grpc_web_headers(host, origin=f"http://{host}"), message())
        assert same.status == 200 and same.trailers["grpc-status"] == "0"
        assert same.headers["access-control-allow-origin"] == f"http://{host}"
    # cors_origins still work from an allowed host
    listed = await http1(web.port, "POST", METADATA, grpc_web_headers(web.host, origin=LISTED_ORIGIN), message())
    assert listed.status == 200 and listed.headers["access-control-allow-origin"] == LISTED_ORIGIN
    ok = await http1(web.port, "OPTIONS", METADATA, [("host", web.host), ("origin", LISTED_ORIGIN)])
    assert ok.status == 204 and ok.headers["access-control-allow-origin"] == LISTED_ORIGIN


@on_session_loop
async def test_a_stalled_body_is_answered_and_the_connection_closed_http1(web, mesh):
    mesh.reset()
    for sent in (message()[:10], b""):  # 10 bytes of 100, then nothing; nothing at all
        answer = await http1(web.port, "POST", METADATA, grpc_web_headers(web.host), sent, declared=100)
        assert answer.status == 200
        assert answer.trailers["grpc-status"] == code(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "stalled" in answer.trailers["grpc-message"]
        assert BODY_TIMEOUT * 0.9 <= answer.seconds < BODY_TIMEOUT + 3, answer.seconds
        assert answer.headers.get("connection") == "close" and answer.closed
    # a stalled body of a request answered early (here: no gRPC-Web content type) is not waited for either
    early = await http1(web.port, "POST", METADATA, [("host", web.host)], b"x" * 10, declared=100)
    assert early.status == 415 and early.seconds < BODY_TIMEOUT + 3 and early.closed
    assert mesh.backends["a"].calls == 0


async def h2_calls(port: int, requests: list[tuple[str, bytes, bool]], timeout: float = 10.0) -> list[dict]:
    """Requests on one h2c (prior knowledge) connection: (path, body, ends): a body that does not end stalls.
    Returns for each its response headers, data and trailers as dicts, and the seconds until its stream ended."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    connection.initiate_connection()
    results: dict[int, dict] = {}
    started = time.monotonic()
    for path, body, ends in requests:
        stream = connection.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"), (":path", path)]
        connection.send_headers(stream, [*headers, ("content-type", GRPC_WEB)], end_stream=not body and ends)
        if body:
            connection.send_data(stream, body, end_stream=ends)
        results[stream] = {"data": b""}
    writer.write(connection.data_to_send())
    try:
        async with asyncio.timeout(timeout):
            while not all("seconds" in r for r in results.values()):
                chunk = await reader.read(65536)
                assert chunk, "the server closed the connection"
                for event in connection.receive_data(chunk):
                    result = results.get(getattr(event, "stream_id", 0))
                    if isinstance(event, h2.events.ResponseReceived):
                        result["headers"] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        result["data"] += event.data
                        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        result["seconds"] = time.monotonic() - started
                writer.write(connection.data_to_send())
    finally:
        writer.close()
    for result in results.values():
        frames = grpcweb.decode_frames(result["data"])
        result["trailers"] = grpcweb.decode_trailers(frames[-1].payload)
    return list(results.values())


@on_session_loop
async def test_a_stalled_body_is_answered_h2(web, mesh):
    mesh.reset()
    stalled, fine = await h2_calls(web.port, [(METADATA, message()[:10], False), (METADATA, message(), True)])
    assert stalled["headers"][":status"] == "200"
    assert stalled["trailers"]["grpc-status"] == code(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert BODY_TIMEOUT * 0.9 <= stalled["seconds"] < BODY_TIMEOUT + 3, stalled["seconds"]
    assert fine["trailers"]["grpc-status"] == "0", "the other stream of the connection is not affected"


@on_session_loop
@pytest.mark.parametrize(
    ("body", "text", "says"),
    [
        (b"", False, "empty"),
        (b"", True, "empty"),
        (b"\r\n", True, "empty"),
        (message()[:-1], False, "ends inside a frame"),  # a cut message
        (message()[:3], False, "ends inside a frame"),  # a cut frame header
        (grpcweb.encode_frame(b"grpc-status: 0\r\n", grpcweb.TRAILER_FLAG), False, "flags"),
        (b"AAAA!", True, "base64"),
    ],
    ids=["empty", "empty-text", "blank-text", "cut-message", "cut-header", "trailer-frame", "bad-base64"],
)
async def test_empty_or_malformed_bodies_are_invalid_argument(web, mesh, body, text, says):
    mesh.reset()
    content_type = "application/grpc-web-text" if text else GRPC_WEB
    headers = [("host", web.host), ("content-type", content_type)]
    for path in (METADATA, PREDICT_STREAM):  # a unary and a streaming method
        answer = await http1(web.port, "POST", path, headers, body)
        assert answer.status == 200 and answer.headers["content-type"] == content_type
        frames = grpcweb.decode_frames(answer.body, text=text)
        assert len(frames) == 1 and frames[0].is_trailers, "only the trailers: no message, no 500, no empty 200"
        trailers = grpcweb.decode_trailers(frames[0].payload)
        assert trailers["grpc-status"] == code(grpc.StatusCode.INVALID_ARGUMENT)
        assert says in trailers["grpc-message"]
        assert answer.seconds < BODY_TIMEOUT, "answered at once, not after a timeout"
    assert sum(b.calls for b in mesh.backends.values()) == 0


@on_session_loop
async def test_an_empty_body_over_h2_is_invalid_argument(web, mesh):
    mesh.reset()
    empty, cut = await h2_calls(web.port, [(METADATA, b"", True), (PREDICT_STREAM, message()[:-1], True)])
    for answer in (empty, cut):
        assert answer["trailers"]["grpc-status"] == code(grpc.StatusCode.INVALID_ARGUMENT)
        assert answer["seconds"] < BODY_TIMEOUT, "answered at once, not after a timeout"
    assert "empty" in empty["trailers"]["grpc-message"]
    assert sum(b.calls for b in mesh.backends.values()) == 0


@on_session_loop
async def test_bodies_and_messages_over_the_limits_are_resource_exhausted(web, mesh):
    mesh.reset()
    request = pb.PredictStreamRequest(id="x" * (MAX_MESSAGE // 2)).SerializeToString()
    many = grpcweb.encode_message(request) * (MAX_BODY // len(request) + 1)  # each message fits, the body not
    big = grpcweb.encode_message(b"x" * (MAX_MESSAGE + 1))
    for body, says in ((many, f"body exceeds the limit of {MAX_BODY}"), (big, f"exceeds the limit of {MAX_MESSAGE}")):
        answer = await http1(web.port, "POST", PREDICT_STREAM, grpc_web_headers(web.host), body)
        assert answer.status == 200
        assert answer.trailers["grpc-status"] == code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert says in answer.trailers["grpc-message"]
    fits = await http1(web.port, "POST", PREDICT_STREAM, grpc_web_headers(web.host), grpcweb.encode_message(request))
    assert fits.trailers["grpc-status"] == "0"


# -- metrics -----------------------------------------------------------------------------------------------------


def request_series(metrics: GatewayMetrics) -> set[tuple]:
    return {
        tuple(sorted(sample.labels.items()))
        for family in metrics.registry.collect()
        if family.name == "modelgrid_gateway_requests"
        for sample in family.samples
        if sample.name == "modelgrid_gateway_requests_total"
    }


def test_only_described_methods_are_known():
    assert described_method(METADATA) and described_method(PREDICT_STREAM)
    for made_up in (
        "/modelgrid.predictor.v1.Predictor/Made",
        "/modelgrid.predictor.v1.Made/Predict",
        "/modelgrid.predictor.v1/Predictor.GetModelMetadata",
        "/modelgrid.predictor.v1.Predictor/GetModelMetadata/x",
        "modelgrid.predictor.v1.Predictor/GetModelMetadata",
        "/modelgrid.predictor.v1.Predictor.GetModelMetadata",
    ):
        assert not described_method(made_up), made_up


@on_session_loop
async def test_made_up_methods_are_counted_under_one_label(web, mesh, authorizer):
    """200 invented paths on the web port and 50 on the native port (all routed: they match a route prefix, and
    the test backends answer any method) add one series; a known method has its own."""
    before = request_series(web.metrics)
    for n in range(200):
        path = f"/modelgrid.predictor.v1.Predictor/Made{n}" if n % 2 else f"/modelgrid.predictor.v1.Made{n}/Call"
        answer = await http1(web.port, "POST", path, grpc_web_headers(web.host), message())
        assert answer.trailers["grpc-status"] == "0"
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ProxyHandler(web.forwarder, authorizer),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for n in range(50):
            call = channel.stream_stream(f"/modelgrid.predictor.v1.Predictor/Native{n}")(iter([b"x"]), timeout=10)
            assert [m async for m in call] == [b"x"]
    await server.stop(0)
    added = request_series(web.metrics) - before
    assert len(added) <= 1, added
    assert all(dict(labels)["method"] == UNKNOWN_METHOD for labels in added)
    assert (
        web.metrics.registry.get_sample_value(
            "modelgrid_gateway_requests_total", {"service": mesh.service, "method": UNKNOWN_METHOD, "code": "OK"}
        )
        >= 250 - 0.5
    )

    answer = await http1(web.port, "POST", METADATA, grpc_web_headers(web.host), message())
    assert answer.trailers["grpc-status"] == "0"
    labels = {"service": mesh.service, "method": METADATA, "code": "OK"}
    assert web.metrics.registry.get_sample_value("modelgrid_gateway_requests_total", labels) >= 1
