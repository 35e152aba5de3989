"""Fuzzing the gateway: its native gRPC front forwarding generated and malformed calls of every routed API, its own
GatewayAdmin API, and its gRPC-Web front with random bodies, framings and headers, against a real gateway process
(API keys on, the web port on) in front of a real registry (own Consul agent, the session's Redis). Then the gateway
and the registry must still be alive and SERVING, and a call must still pass through.

The gateway forwards bytes without decoding them, except the first message of a predictor call, whose model name it
reads with its own wire-format reader (services/gateway/wire.py) to pick a replica: predictor, OIP and TF Serving
calls are fuzzed too, with no predictor running, so they end UNAVAILABLE "no healthy instance of predictor" (the
documented answer when a routed service has no instance) once the gateway has read them. The same goes for the
trainer. Calls to registry methods reach the registry, whose answers pass through."""

import base64
import re
import struct
import time
import uuid
from types import SimpleNamespace

import grpc
import httpx
import pytest
from hypothesis import strategies as st

from modelgrid.common.v1 import common_pb2
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb
from services.kit.localinfra import ConsulAgent, free_port
from services.kit.processes import REPO_ROOT

from tritonclient.grpc import service_pb2 as oip  # isort: skip  (not the project's `inference`: see test_malformed)

pytestmark = pytest.mark.slow  # services as subprocesses (kept in the default run)

ADMIN_KEY = "fuzz-admin-key"
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
TIMEOUT_S = 15.0
STREAM_S = 1.0  # a forwarded watch (or an unknown method called as a stream) may wait: our deadline ends it
NO_INSTANCE = r"^no healthy instance of (predictor|trainer)$"
OIP_METHODS = set(
    re.findall(r"^\s*rpc\s+(\w+)", (REPO_ROOT / "protos/modelgrid/oip/grpc_service.proto").read_text(), re.MULTILINE)
)


def _routed_services() -> dict[str, list]:
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    oip_service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {
        "registry": list(rpb.DESCRIPTOR.services_by_name["ModelRegistry"].methods),
        "predictor": [
            *ppb.DESCRIPTOR.services_by_name["Predictor"].methods,
            *[m for m in oip_service.methods if m.name in OIP_METHODS],
            *prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].methods,
            *model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].methods,
        ],
        "trainer": list(tpb.DESCRIPTOR.services_by_name["Trainer"].methods),
    }


ROUTED = _routed_services()
ADMIN_METHODS = list(gpb.DESCRIPTOR.services_by_name["GatewayAdmin"].methods)


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, channel_to, unique):
    """Own Consul agent, a registry with one model, and a gateway with API keys and its web port on."""
    tmp = tmp_path_factory.mktemp("fuzz-gateway")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        registry_channel, client = client_for(registry)
        model = unique("fzg")
        client.ensure_model(model)
        web_port = free_port()
        gateway = launch.gateway(
            consul.http_url,
            redis_server.url,
            tmp,
            WEB_PORT=str(web_port),
            WEB_DIR=str(tmp / "no-console"),
            AUTH_ENABLED="true",
            ADMIN_KEY=ADMIN_KEY,
            DEFAULT_RATE_LIMIT="1000000",  # the fuzz loop must not spend its cases on the rate limit
            REDIS_KEY_PREFIX=f"mg:fuzz-gateway:{uuid.uuid4().hex[:8]}:",
        )
        channel = channel_to(gateway)
        web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=TIMEOUT_S + 5)
        try:
            wait_routed(channel)
            yield SimpleNamespace(
                registry=registry,
                gateway=gateway,
                channel=channel,
                registry_channel=registry_channel,
                model=model,
                web=web,
            )
        finally:
            web.close()
            channel.close()
            registry_channel.close()
            gateway.stop()
            registry.stop()


def wait_routed(channel: grpc.Channel, timeout: float = 30.0) -> None:
    """Until the gateway has found the registry in Consul (a call is answered NOT_FOUND by the registry)."""
    get_model = channel.unary_unary("/modelgrid.registry.v1.ModelRegistry/GetModel")
    deadline = time.monotonic() + timeout
    while True:
        try:
            get_model(rpb.GetModelRequest(name="absent").SerializeToString(), metadata=ADMIN, timeout=5)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return
        assert time.monotonic() < deadline, "the gateway did not route to the registry"
        time.sleep(0.2)


def credentials() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Mostly the admin key; sometimes none, a wrong one, a malformed header, or an identity to record."""
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
    return st.one_of(
        st.just(ADMIN),
        st.just(ADMIN),
        st.just(ADMIN),
        st.just(()),
        st.tuples(st.tuples(st.sampled_from(("authorization", "x-api-key")), printable)),
        st.tuples(st.just(("x-api-key", ADMIN_KEY)), st.tuples(st.just("x-modelgrid-client"), printable)),
        st.tuples(st.just(ADMIN[0]), st.tuples(st.just("idempotency-key"), printable)),
    )


def seeds(model: str) -> list:
    ref = common_pb2.ModelRef(name=model, alias="production")
    return [
        rpb.GetModelRequest(name=model),
        rpb.ResolveRequest(ref=ref),
        rpb.WatchEventsRequest(cursor="0", model_name=model),
        ppb.PredictRequest(model=ref),
        ppb.PredictStreamRequest(id="1", request=ppb.PredictRequest(model=ref)),
        oip.ModelInferRequest(model_name=model, model_version="production"),
        tpb.GetJobRequest(id="0123456789ab"),
    ]


@st.composite
def routed_call(draw, strategies, methods: list, model: str):
    method = draw(st.sampled_from(methods))
    request = draw(strategies.case(method, [s for s in seeds(model) if s.DESCRIPTOR is method.input_type]))
    return method, request


@pytest.mark.parametrize("service", list(ROUTED))
def test_gateway_forwards(service, mesh, fuzz, protofuzz):
    """Calls of every routed method through the native front: the backend's answer passes through (never
    INTERNAL or UNKNOWN); with no instance of the service, UNAVAILABLE "no healthy instance" and nothing else."""
    strategies = protofuzz(hints=[mesh.model, "production", "canary", "x"])
    allow_details = {grpc.StatusCode.UNAVAILABLE: NO_INSTANCE} if service != "registry" else None

    def body(value) -> None:
        (method, request), metadata = value
        watch = method.name.startswith("Watch")  # WatchEvents, WatchJob: one event or our deadline
        fuzz.call_method(
            mesh.channel,
            method,
            request,
            metadata=metadata,
            timeout=STREAM_S if watch else TIMEOUT_S,
            max_responses=1 if watch else None,
            deadline_is_ours=watch,
            allow_details=allow_details,
        )

    strategy = st.tuples(routed_call(strategies, ROUTED[service], mesh.model), credentials())
    fuzz.run(strategy, body, services=[mesh.gateway, mesh.registry])


def test_gateway_unrouted_paths(mesh, fuzz, protofuzz):
    """Method paths no route names, or unknown methods of a routed service: UNIMPLEMENTED (from the gateway, or
    from the registry it forwarded to), never INTERNAL."""
    segment = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"), max_size=30)
    known = ("modelgrid.registry.v1.ModelRegistry", "modelgrid.registry.v1.", "inference.", "grpc.health.v1.Health")
    prefixes = ("modelgrid.registry.v1.", "modelgrid.trainer.v1.Trainer", "tensorflow.serving.")
    service = st.one_of(segment, st.sampled_from(known), st.tuples(st.sampled_from(prefixes), segment).map("".join))
    path = st.tuples(service, segment).map(lambda t: f"/{t[0]}/{t[1]}")
    kind = st.sampled_from(("unary_unary", "unary_stream", "stream_unary", "stream_stream"))
    request = protofuzz().binaries

    def body(value) -> None:
        path, kind, request, metadata = value
        payload = [request] if kind.startswith("stream") else request
        fuzz.call(
            mesh.channel,
            path,
            payload,
            kind=kind,
            metadata=metadata,
            timeout=STREAM_S if kind.endswith("stream") else TIMEOUT_S,
            max_responses=1,
            deadline_is_ours=kind.endswith("stream"),
            allow=[grpc.StatusCode.UNIMPLEMENTED],  # no such method: nothing serves it
            allow_details={grpc.StatusCode.UNAVAILABLE: NO_INSTANCE},
        )

    fuzz.run(st.tuples(path, kind, request, credentials()), body, services=[mesh.gateway])


@pytest.mark.parametrize("method", ADMIN_METHODS, ids=lambda m: m.name)
def test_gateway_admin(method, mesh, fuzz, protofuzz):
    """The GatewayAdmin API; a key CreateApiKey makes is then used for a call of each front."""
    strategies = protofuzz(hints=["admin", "read", "fuzz"])
    seed = {
        "CreateApiKey": [gpb.CreateApiKeyRequest(name="k", scopes=[gpb.SCOPE_READ], rate_limit=5)],
        "RevokeApiKey": [gpb.RevokeApiKeyRequest(id="0123456789ab")],
    }.get(method.name, [])
    get_model = rpb.GetModelRequest(name=mesh.model).SerializeToString()
    get_routes = ADMIN_METHODS[[m.name for m in ADMIN_METHODS].index("GetRoutes")]

    def body(value) -> None:
        request, metadata = value
        outcome = fuzz.call_method(mesh.channel, method, request, metadata=metadata, timeout=TIMEOUT_S)
        if method.name != "CreateApiKey" or outcome.code != grpc.StatusCode.OK:
            return
        secret = gpb.CreateApiKeyResponse.FromString(outcome.responses[0]).secret
        bearer = (("authorization", f"Bearer {secret}"),)
        fuzz.call(mesh.channel, "/modelgrid.registry.v1.ModelRegistry/GetModel", get_model, metadata=bearer)
        fuzz.call_method(mesh.channel, get_routes, b"", metadata=bearer)
        web_call(fuzz, mesh, "/modelgrid.registry.v1.ModelRegistry/GetModel", frame(get_model), headers=bearer)

    fuzz.run(st.tuples(strategies.case(method, seed), credentials()), body, services=[mesh.gateway])


# -- gRPC-Web --------------------------------------------------------------------------------------------------

WEB_STATUSES = {200, 400, 403, 404, 405, 413, 415, 421}
"""HTTP answers of the web port: 200 carries the gRPC status in its trailer frame; a request that is no gRPC-Web
call gets 4xx (bad request, origin, path, method, size, content type, host). Never 5xx."""
BAD_GRPC_STATUSES = {grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0]}


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def web_call(fuzz, mesh, path: str, content: bytes, *, headers=(), content_type="application/grpc-web+proto"):
    """One gRPC-Web POST of `content` (the body as sent), checked: an HTTP status of WEB_STATUSES, in time; a 200
    ends with a trailer frame whose grpc-status is neither INTERNAL nor UNKNOWN (nor DEADLINE_EXCEEDED unless the
    request's grpc-timeout asked for a deadline, nor UNAVAILABLE but for a routed service without instances)."""
    sent = {"content-type": content_type, "x-grpc-web": "1", **dict(headers)}
    # HTTP/1.1 header values carry no whitespace at their ends (h11 refuses to send them; a server never sees them)
    values = [(k.encode(), (v if isinstance(v, bytes) else v.encode("latin-1")).strip(b" \t")) for k, v in sent.items()]
    wire = [(k, v) for k, v in values if v]
    started = time.monotonic()
    fuzz.stats.calls += 1
    problem, status, details = None, "", ""
    try:
        response = mesh.web.post(path, content=content, headers=wire)
    except httpx.TimeoutException:
        problem = f"hang: no answer within {TIMEOUT_S + 5:g}s"
    except httpx.HTTPError as exc:
        problem = f"connection failed: {type(exc).__name__}: {exc}"
    else:
        status = str(response.status_code)
        if response.status_code not in WEB_STATUSES:
            problem = f"HTTP {response.status_code}"
        elif response.status_code == 200:
            status, details, problem = _web_trailers(response, "grpc-timeout" in sent)
    fuzz.stats.codes[f"web {status or 'failed'}"] += 1
    if problem is None and time.monotonic() - started > TIMEOUT_S + 5:
        problem = f"hang: answered after {time.monotonic() - started:.1f}s"
    if problem is not None:
        shown = f"POST {path} {wire!r}\n".encode() + content
        fuzz.record(f"gRPC-Web {path}", status or "no answer", details, problem, shown)


def _web_trailers(response: httpx.Response, own_timeout: bool) -> tuple[str, str, str | None]:
    """(grpc-status, grpc-message, problem or None) of a 200 answer."""
    data = response.content
    if response.headers.get("content-type", "").startswith("application/grpc-web-text"):
        try:
            data = b"".join(base64.b64decode(part + b"=" * (-len(part) % 4)) for part in re.findall(rb"[^=]+=*", data))
        except ValueError:
            return "", "", "the grpc-web-text answer is not base64"
    frames, at = [], 0
    while at + 5 <= len(data):
        flags, length = struct.unpack_from(">BI", data, at)
        frames.append((flags, data[at + 5 : at + 5 + length]))
        at += 5 + length
    if at != len(data) or not frames or not frames[-1][0] & 0x80:
        return "", "", "the answer does not end with a trailer frame"
    lines = frames[-1][1].decode("latin-1").split("\r\n")
    trailers = dict(line.split(":", 1) for line in lines if ":" in line)
    status, message = trailers.get("grpc-status", "").strip(), trailers.get("grpc-message", "").strip()
    if not status.isdigit():
        return status, message, "the trailer frame has no grpc-status"
    code = int(status)
    if code in BAD_GRPC_STATUSES:
        return status, message, f"grpc-status {code}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and not own_timeout:
        return status, message, "hang: DEADLINE_EXCEEDED with no grpc-timeout of ours"
    if code == grpc.StatusCode.UNAVAILABLE.value[0] and not re.search(NO_INSTANCE, message):
        return status, message, "grpc-status UNAVAILABLE"
    if code == grpc.StatusCode.CANCELLED.value[0]:
        return status, message, "grpc-status CANCELLED"
    return status, message, None


@st.composite
def web_requests(draw, strategies, model: str):
    """(path, body as sent, headers, content type): a routed method with zero or more framed messages, frames with
    odd flags, lengths that lie, bodies cut short, garbage, base64 (text mode) that is not, and odd headers."""
    services = [*ROUTED["registry"], *ROUTED["registry"], *ROUTED["predictor"], *ROUTED["trainer"]]
    method = draw(st.sampled_from(services))
    path = f"/{method.containing_service.full_name}/{method.name}"
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(("/", "//", "/a/b/c", "/x", "/modelgrid.registry.v1.ModelRegistry/", "/a/b")))
    method_seeds = [s for s in seeds(model) if s.DESCRIPTOR is method.input_type]
    messages = draw(st.lists(strategies.wire(method.input_type, method_seeds), max_size=3))
    flags = st.sampled_from((0, 0, 0, 0, 1, 0x80, 0x81, 0xFF, 2))
    body = b"".join(frame(m, draw(flags)) for m in messages)
    how = draw(st.sampled_from(("as is", "as is", "as is", "truncate", "bad length", "garbage", "junk after")))
    if how == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "bad length":
        body = struct.pack(">BI", 0, draw(st.sampled_from((1, 2**31, 2**32 - 1, 64 * 1024 * 1024 + 1)))) + body[5:]
    elif how == "garbage":
        body = draw(st.binary(max_size=64))
    elif how == "junk after":
        body += draw(st.binary(min_size=1, max_size=8))
    content_type = "application/grpc-web+proto"
    if draw(st.booleans()):  # text mode: base64, perhaps broken
        content_type = "application/grpc-web-text"
        body = base64.b64encode(body)
        damage = draw(st.sampled_from(("none", "none", "unpadded", "bad char", "line breaks", "padding inside")))
        if damage == "unpadded":
            body = body.rstrip(b"=")
        elif damage == "bad char" and body:
            at = draw(st.integers(0, len(body) - 1))
            body = body[:at] + draw(st.sampled_from((b"!", b"-", b"_", b"\xff", b"="))) + body[at + 1 :]
        elif damage == "line breaks":
            body = b"\r\n".join(body[i : i + 7] for i in range(0, len(body), 7))
        elif damage == "padding inside":
            body = b"QQ==" + body
    headers = dict(draw(credentials()))
    if draw(st.integers(0, 3)) == 0:
        printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
        odd = st.sampled_from(("1S", "500m", "99999999H", "0n", "1", "S", "-1S", "1.5S", "", " 2S ", "1x"))
        headers["grpc-timeout"] = draw(st.one_of(odd, printable))
    if draw(st.integers(0, 3)) == 0:  # a header that becomes call metadata, or one HTTP keeps: any byte HTTP allows
        keys = ("x-user-agent", "x-foo", "x-foo-bin", "origin", "te", "grpc-encoding", "x-modelgrid-client")
        allowed = st.sampled_from([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
        headers[draw(st.sampled_from(keys))] = bytes(draw(st.lists(allowed, min_size=1, max_size=40)))
    if draw(st.integers(0, 7)) == 0:
        content_type = draw(
            st.sampled_from(
                (
                    "application/grpc-web+json",
                    "application/grpc",
                    "text/plain",
                    "application/grpc-web-text+proto; x=1",
                    "",
                )
            )
        )
    return path, body, headers, content_type


def test_gateway_grpc_web(mesh, fuzz, protofuzz):
    """POSTs to the web port (Host 127.0.0.1:<port>) with random gRPC-Web bodies and headers: answered with an
    HTTP status it documents, never 5xx, never a trailer INTERNAL or UNKNOWN, always in time."""
    strategies = protofuzz(hints=[mesh.model, "production"])

    def body(value) -> None:
        path, content, headers, content_type = value
        if path.rsplit("/", 1)[-1].startswith("Watch") and "grpc-timeout" not in headers:
            # a watch that is asked for right does not end by itself: our deadline ends it (as on the native port)
            headers = {**headers, "grpc-timeout": f"{int(STREAM_S * 1000)}m"}
        web_call(fuzz, mesh, path, content, headers=tuple(headers.items()), content_type=content_type)

    fuzz.run(web_requests(strategies, mesh.model), body, services=[mesh.gateway, mesh.registry])


def test_gateway_stays_healthy(mesh, service_health):
    service_health(mesh.gateway, mesh.channel)
    service_health(mesh.registry, mesh.registry_channel)
    reply = mesh.channel.unary_unary("/modelgrid.registry.v1.ModelRegistry/GetModel")(
        rpb.GetModelRequest(name=mesh.model).SerializeToString(), metadata=ADMIN, timeout=10
    )
    assert rpb.RegisteredModel.FromString(reply).name == mesh.model
    assert mesh.web.get("/healthz").status_code == 200
