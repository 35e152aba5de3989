"""The gateway's gRPC-Web front end to end: a real gateway subprocess in front of a real registry (own Consul agent,
the session's Redis), called with httpx over HTTP/1.1, h2c (prior knowledge) and TLS (ALPN h2), in binary and text
modes: unary calls, server streaming, errors, deadlines, client disconnects, CORS, the console and /healthz; and the
web port's limits: the Host allow-list (DNS rebinding), empty bodies, bodies that stall or are too big, and the
bounded method label of the metrics."""

import base64
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import h11
import httpx
import pytest

from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb
from services.gateway import grpcweb
from services.gateway.settings import GatewaySettings
from services.gateway.web import GrpcWebApp
from services.kit.localinfra import ConsulAgent, free_port
from services.kit.processes import ServiceProcess

SERVICE = "/modelgrid.registry.v1.ModelRegistry"
ALLOWED_ORIGIN = "http://console.example:3000"
TRANSPORTS = {"http1": {"http1": True, "http2": False}, "h2c": {"http1": False, "http2": True}}
MODES = {"binary": "application/grpc-web+proto", "text": "application/grpc-web-text"}


MiB = 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gateway_env(consul: ConsulAgent, redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "CONSUL_URL": consul.http_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"mg:test:{uuid.uuid4().hex[:8]}:",
        "CONSUL_CHECK_INTERVAL": "1s",
        "WEB_PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "CORS_ORIGINS": f'["{ALLOWED_ORIGIN}"]',
        "WEB_DIR": str(tmp / "dist"),
        # Not about API keys (the TLS test turns them on): auth off, and no admin key file made in the checkout.
        "AUTH_ENABLED": "false",
        "ADMIN_KEY_FILE": str(tmp / "admin-key"),
        **extra,
    }


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch):
    """Own Consul agent (the gateway must see only this module's registry), a registry and a gateway."""
    tmp = tmp_path_factory.mktemp("grpcweb")
    (tmp / "dist" / "assets").mkdir(parents=True)
    (tmp / "dist" / "index.html").write_text("<!doctype html><title>console</title>")
    (tmp / "dist" / "assets" / "app.js").write_text("console.log('hi')")
    (tmp / "secret.txt").write_text("not for the web")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "registry")
        env = gateway_env(consul, redis_server.url, tmp)
        gateway = ServiceProcess(
            "services.gateway", "MODELGRID_GATEWAY_", env, tmp / "gateway.log", internal_tls_dir=internal_tls_dir
        )
        try:
            gateway.start()
            base = f"http://127.0.0.1:{env['WEB_PORT']}"
            wait_routed(base)
            yield {"base": base, "registry": registry, "gateway": gateway, "env": env, "consul": consul}
        finally:
            gateway.stop()
            registry.stop()


def wait_routed(base: str, timeout: float = 30.0, **client_options) -> None:
    """Until the gateway has found the registry in Consul (a call is answered by the registry, not UNAVAILABLE)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(**client_options) as client:
        while True:
            try:
                _, _, trailers = call(client, base, "GetModel", pb.GetModelRequest(name="absent"))
                if trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0]):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not route to the registry")
            time.sleep(0.2)


def call(client: httpx.Client, base: str, method: str, request, *, text: bool = False, headers=None):
    """One gRPC-Web call; returns (response, messages, trailers), checking the frame layout on the way."""
    content_type = MODES["text" if text else "binary"]
    body = grpcweb.encode_message(request.SerializeToString())
    response = client.post(
        f"{base}{SERVICE}/{method}",
        content=base64.b64encode(body) if text else body,
        headers={
            "content-type": content_type,
            "x-grpc-web": "1",
            "x-user-agent": "grpc-web-python/test",
            **(headers or {}),
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    frames = grpcweb.decode_frames(response.content, text=text)
    assert frames and frames[-1].is_trailers, "the last frame carries the trailers"
    assert not any(f.is_trailers for f in frames[:-1])
    return response, [f.payload for f in frames[:-1]], grpcweb.decode_trailers(frames[-1].payload)


@pytest.fixture(params=[(t, m) for t in TRANSPORTS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def variant(request):
    transport, mode = request.param
    with httpx.Client(**TRANSPORTS[transport]) as client:
        yield client, mode == "text", "HTTP/2" if transport == "h2c" else "HTTP/1.1"


def test_unary_calls(mesh, variant, unique):
    client, text, http_version = variant
    name = unique("web")
    response, messages, trailers = call(
        client, mesh["base"], "CreateModel", pb.CreateModelRequest(name=name, description="from a browser"), text=text
    )
    assert response.http_version == http_version
    assert trailers["grpc-status"] == "0"
    assert pb.RegisteredModel.FromString(messages[0]).name == name
    _, messages, trailers = call(client, mesh["base"], "GetModel", pb.GetModelRequest(name=name), text=text)
    assert trailers["grpc-status"] == "0"
    model = pb.RegisteredModel.FromString(messages[0])
    assert (model.name, model.description) == (name, "from a browser")


def test_error_status_in_the_trailer_frame(mesh, variant, unique):
    client, text, _ = variant
    name = unique("missing")
    _, messages, trailers = call(client, mesh["base"], "GetModel", pb.GetModelRequest(name=name), text=text)
    assert messages == []
    assert trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert name in trailers["grpc-message"]


def test_server_streaming_download_of_a_3mb_artifact(mesh, variant, tmp_path, client_for, unique):
    client, text, _ = variant
    data = os.urandom(3 * MiB + 12345)
    channel, registry = client_for(mesh["registry"])
    with channel:
        name = unique("blob")
        registry.ensure_model(name)
        (tmp_path / "artifact").write_bytes(data)
        version = registry.push_file(name, tmp_path / "artifact")
    request = pb.DownloadArtifactRequest(ref=common_pb2.ModelRef(name=name, version=version.version))
    _, messages, trailers = call(client, mesh["base"], "DownloadArtifact", request, text=text)
    assert trailers["grpc-status"] == "0", trailers
    replies = [pb.DownloadArtifactResponse.FromString(m) for m in messages]
    assert replies[0].WhichOneof("payload") == "header"
    assert replies[0].header.artifact.digest == sha256_hex(data)
    assert len(replies) > 2, "several chunk messages were streamed"
    assert b"".join(r.chunk for r in replies[1:]) == data


def test_big_multi_frame_request_body_then_download(mesh, variant):
    """A client-streaming call in one body (metadata + 1 MiB chunks, ~3 MB), then the blob back, streamed."""
    client, text, _ = variant
    data = os.urandom(3 * MiB - 7)
    frames = [pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=sha256_hex(data), size_bytes=len(data)))]
    frames += [pb.UploadBlobRequest(chunk=data[i : i + MiB]) for i in range(0, len(data), MiB)]
    body = b"".join(grpcweb.encode_message(f.SerializeToString()) for f in frames)
    response = client.post(
        f"{mesh['base']}{SERVICE}/UploadBlob",
        content=base64.b64encode(body) if text else body,
        headers={"content-type": MODES["text" if text else "binary"]},
        timeout=60,
    )
    replies = grpcweb.decode_frames(response.content, text=text)
    assert grpcweb.decode_trailers(replies[-1].payload)["grpc-status"] == "0"
    assert pb.BlobInfo.FromString(replies[0].payload).size_bytes == len(data)
    request = pb.DownloadBlobRequest(digest=sha256_hex(data))
    _, messages, trailers = call(client, mesh["base"], "DownloadBlob", request, text=text)
    assert trailers["grpc-status"] == "0"
    chunks = [pb.DownloadArtifactResponse.FromString(m) for m in messages]
    assert b"".join(c.chunk for c in chunks if c.WhichOneof("payload") == "chunk") == data


def test_watch_events_until_the_grpc_timeout(mesh, variant, unique):
    client, text, _ = variant
    name = unique("watched")
    call(client, mesh["base"], "CreateModel", pb.CreateModelRequest(name=name), text=text)
    started = time.monotonic()
    request = pb.WatchEventsRequest(cursor="0", model_name=name)
    _, messages, trailers = call(
        client, mesh["base"], "WatchEvents", request, text=text, headers={"grpc-timeout": "2S"}
    )
    elapsed = time.monotonic() - started
    assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert 1.5 < elapsed < 8, elapsed
    events = [pb.RegistryEvent.FromString(m) for m in messages]
    assert [e.model_name for e in events] == [name]
    assert events[0].type == pb.EVENT_TYPE_MODEL_CREATED


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_short_deadline_and_bad_requests(mesh, transport):
    """Early answers (before the body is read) too; over HTTP/2 all of them share one connection, which survives."""
    with httpx.Client(**TRANSPORTS[transport]) as client:
        _, _, trailers = call(
            client, mesh["base"], "WatchEvents", pb.WatchEventsRequest(cursor=""), headers={"grpc-timeout": "300m"}
        )
        assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        _, _, trailers = call(client, mesh["base"], "GetModel", pb.GetModelRequest(), headers={"grpc-timeout": "soon"})
        assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        url = f"{mesh['base']}{SERVICE}/GetModel"
        truncated = grpcweb.encode_message(pb.GetModelRequest(name="x").SerializeToString())[:-1]
        response = client.post(url, content=truncated, headers={"content-type": MODES["binary"]})
        trailers = grpcweb.decode_trailers(grpcweb.decode_frames(response.content)[-1].payload)
        assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert client.post(url, content=b"{}", headers={"content-type": "application/json"}).status_code == 415
        assert client.post(url, content=b"", headers={"content-type": "application/grpc-web+json"}).status_code == 415
        assert (
            client.post(f"{mesh['base']}/x", content=b"", headers={"content-type": MODES["binary"]}).status_code == 404
        )
        unrouted = client.post(
            f"{mesh['base']}/acme.Nope/Call",
            content=base64.b64encode(grpcweb.encode_message(b"")),
            headers={"content-type": MODES["text"]},
        )
        trailers = grpcweb.decode_trailers(grpcweb.decode_frames(unrouted.content, text=True)[-1].payload)
        assert trailers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
        _, _, trailers = call(client, mesh["base"], "GetModel", pb.GetModelRequest(name="still-there"))
        assert trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])


def gateway_requests(metrics_port: str, method: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("modelgrid_gateway_requests_total{") and f'method="{SERVICE}/{method}"' in line
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_disconnect_cancels_the_upstream_call(mesh, transport, client_for, unique):
    channel, registry = client_for(mesh["registry"])
    name = unique("gone")
    registry.ensure_model(name)
    before = gateway_requests(mesh["env"]["METRICS_PORT"], "WatchEvents")
    body = grpcweb.encode_message(pb.WatchEventsRequest(cursor="0", model_name=name).SerializeToString())
    with httpx.Client(**TRANSPORTS[transport]) as client:
        url = f"{mesh['base']}{SERVICE}/WatchEvents"
        with client.stream("POST", url, content=body, headers={"content-type": MODES["binary"]}) as response:
            chunks = response.iter_bytes()  # (a dropped iterator would close the response at once)
            assert grpcweb.FrameDecoder().feed(next(chunks))[0].flags == grpcweb.MESSAGE_FLAG
            time.sleep(0.5)
            assert gateway_requests(mesh["env"]["METRICS_PORT"], "WatchEvents") == before, "still streaming"
    # the connection is closed: the gateway ends the call (and cancels it upstream) at once
    deadline = time.monotonic() + 10
    while gateway_requests(mesh["env"]["METRICS_PORT"], "WatchEvents") == before:
        assert time.monotonic() < deadline, "the gateway kept the call open after the client left"
        time.sleep(0.1)
    channel.close()


def test_cors(mesh):
    url = f"{mesh['base']}{SERVICE}/GetModel"
    asked = "content-type,x-grpc-web,x-user-agent,grpc-timeout,authorization,x-custom"
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": asked}
    with httpx.Client() as client:
        ok = client.options(url, headers={"origin": ALLOWED_ORIGIN, **preflight})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in ok.headers["access-control-allow-methods"]
        allowed = {h.strip() for h in ok.headers["access-control-allow-headers"].split(",")}
        assert {"x-grpc-web", "content-type", "authorization", "x-user-agent", "grpc-timeout", "x-custom"} <= allowed
        assert int(ok.headers["access-control-max-age"]) > 0
        refused = client.options(url, headers={"origin": "http://evil.example", **preflight})
        assert not any(k.startswith("access-control-") for k in refused.headers)

        response, _, trailers = call(
            client, mesh["base"], "GetModel", pb.GetModelRequest(name="nope"), headers={"origin": ALLOWED_ORIGIN}
        )
        assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
        assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
        body = grpcweb.encode_message(pb.GetModelRequest(name="nope").SerializeToString())
        evil = client.post(
            url, content=body, headers={"content-type": MODES["binary"], "origin": "http://evil.example"}
        )
        assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
        same_origin = call(
            client, mesh["base"], "GetModel", pb.GetModelRequest(name="n"), headers={"origin": mesh["base"]}
        )
        assert same_origin[2]["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])


def test_console_and_healthz(mesh):
    with httpx.Client(base_url=mesh["base"]) as client:
        assert client.get("/healthz").text == "ok\n"
        index = client.get("/")
        assert index.status_code == 200 and "<title>console</title>" in index.text
        assert index.headers["content-type"].startswith("text/html")
        script = client.get("/assets/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "immutable" in script.headers["cache-control"]
        assert client.get("/assets/missing.js").status_code == 404
        assert client.get("/../secret.txt").status_code == 404
        assert client.get("/%2e%2e/secret.txt").status_code == 404
        assert client.get("/assets/..%2f..%2fsecret.txt").status_code == 404
        assert client.delete("/").status_code == 405


async def test_console_not_built_page(tmp_path):
    """In-process (no server needed for the static part): without web/dist, / says how to build the console."""
    settings = GatewaySettings(web_dir=tmp_path / "absent", consul_enabled=False)
    app = GrpcWebApp(settings, forwarder=None, authorizer=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
        page = await client.get("/")
        assert page.status_code == 200 and "make web" in page.text
        assert (await client.get("/assets/app.js")).status_code == 404
        assert (await client.get("/healthz")).text == "ok\n"


# -- the web port's limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forged_host_and_dns_rebinding_are_refused(mesh, transport):
    """A page on evil.example resolving to 127.0.0.1 sends Host and Origin of evil.example: refused (421) before
    routing, whatever the request; the console's own hosts (127.0.0.1, localhost, with any port) are answered."""
    port = mesh["env"]["WEB_PORT"]
    url = f"{mesh['base']}{SERVICE}/GetModel"
    body = grpcweb.encode_message(pb.GetModelRequest(name="x").SerializeToString())
    with httpx.Client(**TRANSPORTS[transport]) as client:
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.example:{port}"):
            evil = {"host": host, "origin": f"http://{host}"}
            grpc_web = {**evil, "content-type": MODES["binary"]}
            preflight = {**evil, "access-control-request-method": "POST"}
            for response in (
                client.post(url, content=body, headers=grpc_web),
                client.options(url, headers=preflight),
                client.get(f"{mesh['base']}/", headers=evil),
                client.get(f"{mesh['base']}/healthz", headers={"host": host}),
            ):
                assert response.status_code == 421, (host, response.request.method, response.text)
                assert "access-control-allow-origin" not in response.headers
                assert "ALLOWED_HOSTS" in response.text
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
            same = {"host": host, "origin": f"http://{host}"}
            response, _, trailers = call(client, mesh["base"], "GetModel", pb.GetModelRequest(name="n"), headers=same)
            assert trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
            assert response.headers["access-control-allow-origin"] == f"http://{host}"


def test_empty_body_is_invalid_argument(mesh, variant):
    client, text, _ = variant
    for method in ("GetModel", "UploadBlob", "WatchEvents"):  # unary, client and server streaming
        response = client.post(
            f"{mesh['base']}{SERVICE}/{method}",
            content=b"",
            headers={"content-type": MODES["text" if text else "binary"]},
        )
        assert response.status_code == 200
        frames = grpcweb.decode_frames(response.content, text=text)
        assert len(frames) == 1 and frames[0].is_trailers, frames
        trailers = grpcweb.decode_trailers(frames[0].payload)
        assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]), (method, trailers)
        assert "empty" in trailers["grpc-message"]


def test_two_requests_to_a_one_request_method_are_invalid_argument_at_once(mesh, variant, unique):
    """Found by `make fuzz`: WatchEvents (server streaming) with two request frames hung until the client gave up
    (the registry read the first and watched); a unary method's were sent on as a stream."""
    client, text, _ = variant
    name = unique("two")
    requests = {
        "WatchEvents": pb.WatchEventsRequest(cursor="0", model_name=name),
        "GetModel": pb.GetModelRequest(name=name),
    }
    for method, request in requests.items():
        body = grpcweb.encode_message(request.SerializeToString()) * 2
        started = time.monotonic()
        response = client.post(
            f"{mesh['base']}{SERVICE}/{method}",
            content=base64.b64encode(body) if text else body,
            headers={"content-type": MODES["text" if text else "binary"]},
            timeout=30,
        )
        assert time.monotonic() - started < 5, f"{method} took {time.monotonic() - started:.1f} s"
        frames = grpcweb.decode_frames(response.content, text=text)
        assert len(frames) == 1 and frames[0].is_trailers, frames
        trailers = grpcweb.decode_trailers(frames[0].payload)
        assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]), (method, trailers)
        assert "exactly one request message" in trailers["grpc-message"]


def request_series(metrics_port: str) -> set[str]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    return {
        line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("modelgrid_gateway_requests_total{")
    }


def test_made_up_methods_add_at_most_one_series(mesh):
    """200 invented paths that the routes send to the trainer (none runs in this module: each call ends
    UNAVAILABLE) are counted under one method label; a real method keeps its own."""
    before = request_series(mesh["env"]["METRICS_PORT"])
    body = grpcweb.encode_message(b"")
    with httpx.Client() as client:
        for n in range(200):
            path = f"/modelgrid.trainer.v1.Trainer/Made{n}" if n % 2 else f"/modelgrid.trainer.v1.TrainerFake{n}/Call"
            response = client.post(f"{mesh['base']}{path}", content=body, headers={"content-type": MODES["binary"]})
            trailers = grpcweb.decode_trailers(grpcweb.decode_frames(response.content)[-1].payload)
            assert trailers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0]), (path, trailers)
        call(client, mesh["base"], "GetModel", pb.GetModelRequest(name="counted"))
    after = request_series(mesh["env"]["METRICS_PORT"])
    added = {series for series in after - before if 'service="trainer"' in series}
    assert len(added) <= 1 and all('method="unknown"' in series for series in added), added
    assert not any("Made" in series or "Fake" in series for series in after)
    assert any(f'method="{SERVICE}/GetModel"' in series for series in after)


def stalled_post(port: int, host: str, path: str, sent: bytes, declared: int, timeout: float = 30.0):
    """A POST that declares `declared` body bytes, sends `sent` and then nothing; returns the response, its body,
    the seconds until the answer had come and whether the gateway then closed the connection."""
    client = h11.Connection(h11.CLIENT)
    headers = [("host", host), ("content-type", MODES["binary"]), ("content-length", str(declared))]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(client.send(h11.Request(method="POST", target=path, headers=headers)) + sent)
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
    return response, body, seconds, closed


def test_limits_on_a_gateway_with_low_ones(internal_tls_dir, mesh, redis_server, tmp_path):
    """A second gateway with a 1 s body read timeout, a 64 KiB body limit and its own allowed host: a body that
    stalls is answered DEADLINE_EXCEEDED and its connection closed; a body too big RESOURCE_EXHAUSTED; the
    configured host replaces the default names, the gateway's own address stays allowed."""
    limits = {
        "WEB_BODY_TIMEOUT_SECONDS": "1",
        "WEB_MAX_BODY_BYTES": str(64 * 1024),
        "WEB_ALLOWED_HOSTS": '["console.example"]',
    }
    env = gateway_env(mesh["consul"], redis_server.url, tmp_path, **limits)
    gateway = ServiceProcess(
        "services.gateway", "MODELGRID_GATEWAY_", env, tmp_path / "gw.log", internal_tls_dir=internal_tls_dir
    )
    gateway.start()
    try:
        port = int(env["WEB_PORT"])
        base = f"http://127.0.0.1:{port}"
        wait_routed(base)
        body = grpcweb.encode_message(pb.GetModelRequest(name="x").SerializeToString())
        for sent in (body[:10], b""):
            response, answer, seconds, closed = stalled_post(
                port, f"127.0.0.1:{port}", f"{SERVICE}/GetModel", sent, 100
            )
            assert response.status_code == 200
            trailers = grpcweb.decode_trailers(grpcweb.decode_frames(answer)[-1].payload)
            assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]), trailers
            assert "stalled" in trailers["grpc-message"]
            assert 0.9 <= seconds < 5, seconds
            assert closed, "the connection of a stalled body is closed"
        with httpx.Client() as client:
            data = os.urandom(70 * 1024)
            metadata = pb.BlobMetadata(digest=sha256_hex(data), size_bytes=len(data))
            frames = [pb.UploadBlobRequest(metadata=metadata)]
            frames += [pb.UploadBlobRequest(chunk=data[i : i + 1024]) for i in range(0, len(data), 1024)]
            big = b"".join(grpcweb.encode_message(f.SerializeToString()) for f in frames)
            response = client.post(
                f"{base}{SERVICE}/UploadBlob", content=big, headers={"content-type": MODES["binary"]}
            )
            trailers = grpcweb.decode_trailers(grpcweb.decode_frames(response.content)[-1].payload)
            assert trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), trailers
            for host, status in (("console.example", 200), (f"console.example:{port}", 200), ("localhost", 421)):
                assert client.get(f"{base}/healthz", headers={"host": host}).status_code == status, host
            assert client.get(f"{base}/healthz").status_code == 200  # 127.0.0.1: the gateway's own address
    finally:
        gateway.stop()


# -- TLS and API keys on a second gateway --------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (with `cryptography` when installed, else openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        assert shutil.which("openssl"), "neither the cryptography package nor the openssl command is available"
        command = (
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost"
        )
        san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
        files = ["-keyout", str(key), "-out", str(cert)]
        subprocess.run([*command.split(), *files, "-addext", san], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    builder = x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
    builder = builder.serial_number(x509.random_serial_number()).add_extension(names, critical=False)
    builder = builder.not_valid_before(now - datetime.timedelta(minutes=5))
    certificate = builder.not_valid_after(now + datetime.timedelta(days=2)).sign(private, hashes.SHA256())
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    return cert, key


def test_tls_with_http1_and_h2_alpn_and_api_keys(internal_tls_dir, mesh, redis_server, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    tls = {"TLS_CERT": str(cert), "TLS_KEY": str(key), "AUTH_ENABLED": "true", "ADMIN_KEY": "s3cret-admin-key"}
    env = gateway_env(mesh["consul"], redis_server.url, tmp_path, **tls)
    gateway = ServiceProcess(
        "services.gateway",
        "MODELGRID_GATEWAY_",
        env,
        tmp_path / "gw.log",
        root_certificates=cert.read_bytes(),
        internal_tls_dir=internal_tls_dir,
    )
    gateway.start()
    try:
        base = f"https://127.0.0.1:{env['WEB_PORT']}"
        trust = ssl.create_default_context(cafile=str(cert))
        admin = {"authorization": "Bearer s3cret-admin-key"}
        for options, version in (({"http1": True, "http2": False}, "HTTP/1.1"), ({"http2": True}, "HTTP/2")):
            with httpx.Client(verify=trust, **options) as client:
                deadline = time.monotonic() + 30
                while True:
                    response, _, trailers = call(client, base, "GetModel", pb.GetModelRequest(name="x"), headers=admin)
                    if trailers["grpc-status"] != str(grpc.StatusCode.UNAVAILABLE.value[0]):
                        break
                    assert time.monotonic() < deadline, trailers
                    time.sleep(0.2)
                assert response.http_version == version
                assert trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
                _, _, trailers = call(client, base, "GetModel", pb.GetModelRequest(name="x"), text=True)
                assert trailers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
                assert "API key" in trailers["grpc-message"]
                _, _, trailers = call(client, base, "GetModel", pb.GetModelRequest(), headers={"x-api-key": "x.y"})
                assert trailers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
                assert client.get(f"{base}/healthz").text == "ok\n"
        with pytest.raises(httpx.HTTPError):  # plaintext is refused on a TLS port
            httpx.get(f"http://127.0.0.1:{env['WEB_PORT']}/healthz", timeout=5)
        started = time.monotonic()
        assert gateway.terminate() == 0, "SIGTERM stops the gateway, web front included, cleanly"
        assert time.monotonic() - started < 10
    finally:
        gateway.stop()
