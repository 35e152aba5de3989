"""Class 7, the gateway's web port (gRPC-Web and console): a request for a Host not allow-listed is refused (421)
before anything else, so a DNS-rebinding page (its own name in Host and Origin, resolving to the gateway) reaches
nothing; a POST whose body stops coming is ended by the body timeout and its connection closed; an empty body gets
a clear INVALID_ARGUMENT; and made-up method paths, on the web and the native port, with a key or without, add no
Prometheus series. The gateway here has a 1 s body timeout and its default allowed hosts."""

import base64
import socket
import time

import grpc
import h11
import httpx
import pytest

from modelgrid.registry.v1 import registry_pb2 as rpb
from services.gateway import grpcweb

MESH = {"gateway": {"WEB_BODY_TIMEOUT_SECONDS": "1"}}
BODY_TIMEOUT_S = 1.0
REGISTRY = "/modelgrid.registry.v1.ModelRegistry"
GRPC_WEB = "application/grpc-web+proto"
TRANSPORTS = {"http1": {"http1": True, "http2": False}, "h2c": {"http1": False, "http2": True}}
CODES = {code.value[0]: code for code in grpc.StatusCode}


def trailers_of(body: bytes, text: bool = False) -> dict[str, str]:
    frames = grpcweb.decode_frames(body, text=text)
    assert frames and frames[-1].is_trailers, body[:200]
    return grpcweb.decode_trailers(frames[-1].payload)


def code_of(body: bytes, text: bool = False) -> grpc.StatusCode:
    return CODES[int(trailers_of(body, text)["grpc-status"])]


def forged_hosts(port: int) -> list[str]:
    return ["evil.example", f"evil.example:{port}", f"127.0.0.1.nip.example:{port}", f"localhost.evil.example:{port}"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_host_not_allowed_is_refused_before_anything(mesh, unique, transport):
    """Class 7, DNS rebinding and Host forgery: a page on evil.example resolving to the gateway sends its own name
    as Host and as Origin; with the admin key even, its gRPC-Web call, its CORS preflight, the console and /healthz
    are refused 421 without CORS headers, and the call never reaches the registry; the gateway's own names are
    answered."""
    name = unique("rebound")
    body = grpcweb.encode_message(rpb.CreateModelRequest(name=name).SerializeToString())
    with httpx.Client(**TRANSPORTS[transport]) as client:
        for host in forged_hosts(mesh.web_port):
            forged = {"host": host, "origin": f"http://{host}"}
            call = {**forged, "content-type": GRPC_WEB, "authorization": f"Bearer {mesh.admin_key}"}
            preflight = {**forged, "access-control-request-method": "POST"}
            for response in (
                client.post(f"{mesh.web}{REGISTRY}/CreateModel", content=body, headers=call),
                client.options(f"{mesh.web}{REGISTRY}/CreateModel", headers=preflight),
                client.get(f"{mesh.web}/", headers=forged),
                client.get(f"{mesh.web}/healthz", headers={"host": host}),
            ):
                assert response.status_code == 421, (host, response.request.method, response.status_code)
                assert not any(k.startswith("access-control-") for k in response.headers)
                assert "ALLOWED_HOSTS" in response.text
        mesh.unary("direct", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name=name)).assert_code(
            grpc.StatusCode.NOT_FOUND
        )
        for host in (f"127.0.0.1:{mesh.web_port}", f"localhost:{mesh.web_port}"):
            own = {"host": host, "origin": f"http://{host}", "content-type": GRPC_WEB}
            own["authorization"] = f"Bearer {mesh.admin_key}"
            answered = client.post(f"{mesh.web}{REGISTRY}/CreateModel", content=body, headers=own)
            assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == f"http://{host}"
            assert code_of(answered.content) in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS)


def test_an_allowed_host_with_a_foreign_origin_is_refused(mesh, unique):
    """Class 7, cross-site calls: a page elsewhere calling the gateway by its own name (Host allowed, Origin
    foreign and not in CORS_ORIGINS) gets 403 and no CORS headers; nothing reaches the registry."""
    name = unique("cross-site")
    body = grpcweb.encode_message(rpb.CreateModelRequest(name=name).SerializeToString())
    headers = {"origin": "http://evil.example", "content-type": GRPC_WEB, "authorization": f"Bearer {mesh.admin_key}"}
    response = httpx.post(f"{mesh.web}{REGISTRY}/CreateModel", content=body, headers=headers)
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers
    mesh.unary("direct", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name=name)).assert_code(grpc.StatusCode.NOT_FOUND)


def stalled_post(port: int, path: str, sent: bytes, declared: int, headers: dict[str, str], timeout: float = 30.0):
    """A POST declaring `declared` body bytes that sends `sent` and then nothing: (status, body, seconds until the
    answer had come, whether the gateway then closed the connection)."""
    client = h11.Connection(h11.CLIENT)
    fields = [("host", f"127.0.0.1:{port}"), ("content-type", GRPC_WEB), ("content-length", str(declared))]
    fields += list(headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(client.send(h11.Request(method="POST", target=path, headers=fields)) + sent)
        started = time.monotonic()
        response, body = None, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        seconds = time.monotonic() - started
        sock.settimeout(5)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    assert response is not None
    return response.status_code, body, seconds, closed


@pytest.mark.parametrize("sent", ["part-of-a-message", "nothing"])
def test_a_body_that_never_arrives_is_ended_by_the_body_timeout(mesh, unique, sent):
    """Class 7, slowloris: a POST (with a valid key) that declares a 100-byte body and sends 10 bytes of it, or none,
    then nothing, is answered DEADLINE_EXCEEDED after the 1 s body timeout and its connection closed; the call never
    reaches the registry."""
    name = unique("slow")
    message = grpcweb.encode_message(rpb.CreateModelRequest(name=name).SerializeToString())
    part = message[:10] if sent == "part-of-a-message" else b""
    status, body, seconds, closed = stalled_post(
        mesh.web_port, f"{REGISTRY}/CreateModel", part, 100, {"authorization": f"Bearer {mesh.admin_key}"}
    )
    assert status == 200
    trailers = trailers_of(body)
    assert CODES[int(trailers["grpc-status"])] == grpc.StatusCode.DEADLINE_EXCEEDED, trailers
    assert "stalled" in trailers["grpc-message"]
    assert BODY_TIMEOUT_S * 0.9 <= seconds < BODY_TIMEOUT_S + 4, seconds
    assert closed, "the connection of a stalled body stays open"
    mesh.unary("direct", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name=name)).assert_code(grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
@pytest.mark.parametrize("method", ["GetModel", "UploadBlob", "WatchEvents", "CreateVersion"])
def test_an_empty_body_gets_a_clear_error(mesh, method, text):
    """Class 7, empty requests: a gRPC-Web POST with no message at all (unary, client- and server-streaming
    methods) is answered at once with only a trailer frame, INVALID_ARGUMENT saying the body is empty; no 500, no
    empty 200, no wait for a timeout."""
    content_type = "application/grpc-web-text" if text else GRPC_WEB
    headers = {"content-type": content_type, "authorization": f"Bearer {mesh.admin_key}"}
    started = time.monotonic()
    response = httpx.post(f"{mesh.web}{REGISTRY}/{method}", content=b"", headers=headers, timeout=30)
    assert time.monotonic() - started < BODY_TIMEOUT_S
    assert response.status_code == 200 and response.headers["content-type"] == content_type
    frames = grpcweb.decode_frames(response.content, text=text)
    assert len(frames) == 1 and frames[0].is_trailers, frames
    trailers = grpcweb.decode_trailers(frames[0].payload)
    assert CODES[int(trailers["grpc-status"])] == grpc.StatusCode.INVALID_ARGUMENT, trailers
    assert "empty" in trailers["grpc-message"]


def metric_lines(mesh) -> set[str]:
    """The gateway's metric series (sample lines without their values)."""
    text = httpx.get(mesh.metrics_url).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def made_up_paths(count: int) -> list[str]:
    shapes = [
        "/modelgrid.registry.v1.ModelRegistry/Made{n}",  # a routed service, a method it does not have
        "/modelgrid.registry.v1.Made{n}/Call",  # a routed package, a service it does not have
        "/acme.Nope{n}/Call",  # no route at all
    ]
    return [shapes[n % len(shapes)].format(n=n) for n in range(count)]


def test_made_up_method_paths_add_no_prometheus_series(mesh):
    """Class 7, metric cardinality: 300 invented method paths on the web port and 90 on the native port, each with
    the admin key and without a key, add a bounded set of series (method="unknown": one per metric family, status and
    service), none naming a made-up path, and 30 more invented paths add none at all; a real method keeps its own
    label."""
    mesh.unary("web", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name="counted"))  # the known method's series
    before = metric_lines(mesh)
    body = base64.b64encode(grpcweb.encode_message(b""))  # text mode, for a change
    expected = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED}
    with httpx.Client() as client:
        for n, path in enumerate(made_up_paths(300)):
            headers = {"content-type": "application/grpc-web-text"}
            if n % 2:
                headers["authorization"] = f"Bearer {mesh.admin_key}"
            response = client.post(f"{mesh.web}{path}", content=body, headers=headers)
            assert code_of(response.content, text=True) in expected, path
    channel = mesh.channel("gateway")
    for n, path in enumerate(made_up_paths(90)):
        metadata = mesh.admin if n % 2 else ()
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(path)(b"", metadata=metadata, timeout=10)
        assert err.value.code() in expected, path
    after = metric_lines(mesh)
    added = after - before
    assert not any("Made" in line or "Nope" in line for line in after), [line for line in after if "Made" in line][:3]
    assert len(added) <= 40, sorted(added)
    assert all('method="unknown"' in line or "method=" not in line for line in added), sorted(added)
    for n, path in enumerate(made_up_paths(330)[300:]):  # paths not seen yet: the series do not grow with them
        metadata = mesh.admin if n % 2 else ()
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(path)(b"", metadata=metadata, timeout=10)
    assert metric_lines(mesh) == after
    assert any('method="unknown"' in line for line in after), "the made-up calls were counted under one label"
    assert any(f'method="{REGISTRY}/GetModel"' in line for line in after)
