"""The gateway end to end: every call kind through it to real services found in Consul, failover between
predictor replicas, canary weights, API keys and shared rate limits, and one trace across the hops."""

import concurrent.futures
import json
import os
import signal
import threading
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor, tensor_to_array
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.gateway import grpcweb
from services.kit.localinfra import ConsulAgent, free_port
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
ADMIN_KEY = "admin-secret-for-tests"
STREAMS_PER_CALLER = 3
"""MAX_STREAMS_PER_CALLER of the gateways with API keys."""
DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"


def predict_request(ref: str, x: np.ndarray) -> pb.PredictRequest:
    """A PredictRequest of `ref` ("name", "name:3", "name@alias") with input "x"."""
    return pb.PredictRequest(model=ref_to_pb(ref), inputs={"x": array_to_tensor(x)})


@pytest.fixture(scope="module")
def mesh(
    internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, otlp_collector
):
    tmp = tmp_path_factory.mktemp("gateway")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export spans quickly (inherited by the services)
    collector = otlp_collector
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        otel = {"OTEL_EXPORTER": "otlp", "OTEL_ENDPOINT": f"http://127.0.0.1:{collector.port}"}
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg", **otel)
        channel, client = client_for(registry)
        model = unique("gw")
        client.ensure_model(model)
        for seed in (1, 2):
            client.push_savedmodel(model, build_saved_model(tmp / f"m{seed}", seed=seed))
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="canary", version=2))
        with launch.together():
            predictors = [
                launch.predictor(consul.http_url, redis_server.url, tmp / f"p{i}", [], AUTO_LOAD="true", **otel)
                for i in range(2)
            ]
            gateway = launch.gateway(consul.http_url, redis_server.url, tmp, **otel)
        gateway_channel = grpc.insecure_channel(gateway.target)
        ns = SimpleNamespace(
            tmp=tmp,
            consul=consul,
            redis_url=redis_server.url,
            registry=registry,
            client=client,
            model=model,
            predictors=predictors,
            gateway=gateway,
            channel=gateway_channel,
            collector=collector,
            predictor=predictor_pb2_grpc.PredictorStub(gateway_channel),
            admin=gateway_pb2_grpc.GatewayAdminStub(gateway_channel),
        )

        def both_predictors_serve_the_model(routes) -> bool:
            return len(routes["predictor"]) == 2 and all(f"model={model}" in u.tags for u in routes["predictor"])

        _wait_routes(ns, both_predictors_serve_the_model)
        try:
            yield ns
        finally:
            gateway_channel.close()
            channel.close()
            gateway.stop()
            for predictor in predictors:
                predictor.stop()
            registry.stop()
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)


def _routes(ns) -> dict[str, list[gpb.Upstream]]:
    return {r.service: list(r.upstreams) for r in ns.admin.GetRoutes(gpb.GetRoutesRequest()).routes}


def _wait_routes(ns, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not predicate(routes := _routes(ns)):
        assert time.monotonic() < deadline, f"routing table never matched: {routes}"
        time.sleep(0.2)
    return routes


def _registry_via_gateway(ns):
    from modelgrid.client.registry import RegistryClient

    return RegistryClient(ns.channel, client_id="through-gateway")


# -- every call kind ------------------------------------------------------------------------------------------


def test_unary_client_server_and_bidi_calls_pass_through(mesh, unique):
    registry = _registry_via_gateway(mesh)
    name = unique("kinds")
    registry.ensure_model(name)  # unary
    path = mesh.tmp / "blob"
    path.write_bytes(os.urandom(2_500_000))
    version = registry.push_file(name, path)  # client streaming
    registry.download(f"{name}:{version.version}", mesh.tmp / "back")  # server streaming
    assert (mesh.tmp / "back").read_bytes() == path.read_bytes()
    requests = [
        pb.PredictStreamRequest(id=str(i), request=predict_request(f"{mesh.model}@production", X)) for i in range(5)
    ]
    answers = list(mesh.predictor.PredictStream(iter(requests), timeout=30))  # bidirectional
    assert sorted(a.id for a in answers) == ["0", "1", "2", "3", "4"]
    assert all(a.response.version == 1 for a in answers)
    history = registry.stub.GetHistory(rpb.GetHistoryRequest(model_name=name)).events
    assert {e.actor for e in history} == {"through-gateway"}  # the caller's identity reached the registry


def test_trailers_and_errors_pass_through(mesh):
    response, call = mesh.predictor.Predict.with_call(predict_request(f"{mesh.model}@production", X), timeout=30)
    trailers = dict(call.trailing_metadata())
    assert trailers["x-modelgrid-replica"].startswith("predictor-")
    assert trailers["x-modelgrid-version"] == "1" == str(response.version)
    with pytest.raises(grpc.RpcError) as err:
        mesh.predictor.Predict(predict_request(f"{mesh.model}@production", X.astype(np.float64)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "float32" in err.value.details()


def test_an_rpc_the_gateway_was_never_told_about_still_works(mesh):
    # The gateway routes by proto package; nothing in it names this method.
    method = mesh.channel.unary_unary(
        "/modelgrid.registry.v1.ModelRegistry/StatBlob",
        request_serializer=rpb.StatBlobRequest.SerializeToString,
        response_deserializer=rpb.BlobInfo.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        method(rpb.StatBlobRequest(digest="0" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        mesh.channel.unary_unary("/no.such.Service/Method")(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_deadline_travels_and_cancellation_reaches_the_backend(mesh):
    via = _registry_via_gateway(mesh).stub.WatchEvents(rpb.WatchEventsRequest(), timeout=1.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(via)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < time.monotonic() - started < 5

    watching = _registry_via_gateway(mesh).stub.WatchEvents(rpb.WatchEventsRequest())
    _wait_routes(mesh, lambda routes: sum(u.outstanding for u in routes["registry"]) == 1, timeout=10)
    watching.cancel()
    _wait_routes(mesh, lambda routes: sum(u.outstanding for u in routes["registry"]) == 0, timeout=10)


# -- balancing and failover -----------------------------------------------------------------------------------


def test_calls_spread_over_replicas_and_a_killed_replica_fails_no_call(mesh):
    replicas = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def keep_calling():
        with grpc.insecure_channel(mesh.gateway.target) as channel:
            stub = predictor_pb2_grpc.PredictorStub(channel)
            while not stop.is_set():
                try:
                    _, call = stub.Predict.with_call(predict_request(f"{mesh.model}@production", X), timeout=30)
                    replicas[dict(call.trailing_metadata())["x-modelgrid-replica"]] += 1
                except grpc.RpcError as err:
                    failures.append(f"{err.code()}: {err.details()}")

    callers = [threading.Thread(target=keep_calling) for _ in range(4)]
    for caller in callers:
        caller.start()
    try:
        time.sleep(2)
        assert len(replicas) == 2, f"calls did not spread: {replicas}"
        victim = mesh.predictors[1]
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        time.sleep(4)
    finally:
        stop.set()
        for caller in callers:
            caller.join()
    assert failures == []
    routes = _wait_routes(mesh, lambda r: len(r["predictor"]) == 1, timeout=30)  # Consul saw it go critical
    assert routes["predictor"][0].target == mesh.predictors[0].target


# -- canary ---------------------------------------------------------------------------------------------------


def _versions_answering(mesh, calls: int) -> Counter:
    counts = Counter()
    for _ in range(calls):
        counts[mesh.predictor.Predict(predict_request(f"{mesh.model}@production", X), timeout=30).version] += 1
    return counts


def test_canary_weight_splits_traffic_and_rollback_is_immediate(mesh):
    weight = {"modelgrid.canary-weight": "0.3"}
    mesh.client.stub.UpdateModel(rpb.UpdateModelRequest(name=mesh.model, set_tags=weight))
    time.sleep(0.5)
    counts = _versions_answering(mesh, 400)
    assert 0.2 <= counts[2] / 400 <= 0.4, counts
    mesh.client.stub.UpdateModel(rpb.UpdateModelRequest(name=mesh.model, set_tags={"modelgrid.canary-weight": "0"}))
    time.sleep(0.3)
    assert _versions_answering(mesh, 100) == Counter({1: 100})


# -- tracing --------------------------------------------------------------------------------------------------


def test_one_trace_from_the_gateway_through_the_predictor_to_the_registry(mesh, unique):
    name = unique("traced")
    mesh.client.ensure_model(name)
    mesh.client.push_savedmodel(name, mesh.tmp / "m1")
    mesh.predictor.LoadModel(pb.LoadModelRequest(name=name, wait=True), timeout=60)
    method = "/modelgrid.predictor.v1.Predictor/LoadModel"
    deadline = time.monotonic() + 15
    while True:
        spans = list(mesh.collector.spans)
        roots = [s for s in spans if s.service == "gateway" and s.name == method and s.kind == 2]  # SERVER
        trace = [s for s in spans if roots and s.trace_id == roots[-1].trace_id]
        services = {s.service for s in trace}
        if {"gateway", "predictor", "registry"} <= services:
            break
        assert time.monotonic() < deadline, f"spans of one trace never reached every service: {services}"
        time.sleep(0.3)
    by_id = {s.span_id: s for s in trace}

    def parent_service(span):
        return by_id[span.parent_id].service if span.parent_id in by_id else None

    predictor_server = [s for s in trace if s.service == "predictor" and s.name == method and s.kind == 2]
    assert predictor_server and parent_service(predictor_server[0]) == "gateway"  # via the gateway's client span
    registry_server = [s for s in trace if s.service == "registry" and s.kind == 2]
    assert registry_server and all(parent_service(s) == "predictor" for s in registry_server)


def test_one_trace_from_the_gateway_through_the_trainer_to_the_registry(mesh, launch, unique, digits_spec):
    from modelgrid.trainer.v1 import trainer_pb2 as tpb
    from modelgrid.trainer.v1 import trainer_pb2_grpc

    otel = {"OTEL_EXPORTER": "otlp", "OTEL_ENDPOINT": f"http://127.0.0.1:{mesh.collector.port}"}
    trainer = launch.trainer(mesh.consul.http_url, mesh.redis_url, mesh.tmp / "trainer", f"mg:{unique('t')}:", **otel)
    try:
        _wait_routes(mesh, lambda routes: len(routes.get("trainer", [])) == 1)
        digest = mesh.client.upload_blob(DIGITS_NPZ).digest
        spec = digits_spec()
        spec.dataset.ClearField("local_path")
        spec.dataset.blob_digest = digest  # the trainer fetches it from the registry while handling SubmitJob
        stub = trainer_pb2_grpc.TrainerStub(mesh.channel)
        job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec))  # no agents here: it waits, then is cancelled
        stub.CancelJob(tpb.CancelJobRequest(id=job.id))
        method = "/modelgrid.trainer.v1.Trainer/SubmitJob"
        deadline = time.monotonic() + 15
        while True:
            spans = list(mesh.collector.spans)
            roots = [s for s in spans if s.service == "gateway" and s.name == method and s.kind == 2]
            trace = [s for s in spans if roots and s.trace_id == roots[-1].trace_id]
            by_id = {s.span_id: s for s in trace}
            trainer_server = [s for s in trace if s.service == "trainer" and s.name == method and s.kind == 2]
            registry_server = [s for s in trace if s.service == "registry" and s.kind == 2]
            if trainer_server and registry_server:
                break
            assert time.monotonic() < deadline, f"no full trace: {[(s.service, s.name) for s in trace]}"
            time.sleep(0.3)
        assert by_id[trainer_server[0].parent_id].service == "gateway"
        assert all(by_id[s.parent_id].service == "trainer" for s in registry_server if s.parent_id in by_id)
    finally:
        trainer.stop()


# -- auth and rate limits (two more gateways sharing Redis) ---------------------------------------------------


@pytest.fixture(scope="module")
def secured(mesh, launch, unique):
    settings = {
        "AUTH_ENABLED": "true",
        "ADMIN_KEY": ADMIN_KEY,
        "DEFAULT_RATE_LIMIT": "100",
        "MAX_STREAMS_PER_CALLER": str(STREAMS_PER_CALLER),
        "REDIS_KEY_PREFIX": f"mg:test-gw:{unique('k')}:",
    }
    web_ports = [free_port() for _ in range(2)]
    gateways = [
        launch.gateway(mesh.consul.http_url, mesh.redis_url, mesh.tmp, WEB_PORT=str(port), **settings)
        for port in web_ports
    ]
    channels = [grpc.insecure_channel(g.target) for g in gateways]
    yield SimpleNamespace(gateways=gateways, channels=channels, web=[f"http://127.0.0.1:{p}" for p in web_ports])
    for channel in channels:
        channel.close()
    for gateway in gateways:
        gateway.stop()


def _bearer(secret: str):
    return (("authorization", f"Bearer {secret}"),)


def test_auth_is_on_by_default_with_an_admin_key_only_its_operator_can_read(mesh, launch, tmp_path):
    key_file = tmp_path / "state" / "admin-key"
    defaults = {"AUTH_ENABLED": None, "ADMIN_KEY_FILE": str(key_file)}  # auth as the gateway has it by default
    gateway = launch.gateway(mesh.consul.http_url, mesh.redis_url, tmp_path, **defaults)
    try:
        assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o077 == 0
        secret = key_file.read_text().strip()
        with grpc.insecure_channel(gateway.target) as channel:
            models = predictor_pb2_grpc.PredictorStub(channel).ListModels
            with pytest.raises(grpc.RpcError) as err:
                models(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert models(pb.ListModelsRequest(), metadata=_bearer(secret), timeout=10) is not None
            made = gateway_pb2_grpc.GatewayAdminStub(channel).CreateApiKey(
                gpb.CreateApiKeyRequest(name="reader", scopes=[gpb.SCOPE_READ]), metadata=_bearer(secret), timeout=10
            )
            assert models(pb.ListModelsRequest(), metadata=_bearer(made.secret), timeout=10) is not None
    finally:
        gateway.stop()
    again = launch.gateway(mesh.consul.http_url, mesh.redis_url, tmp_path, **defaults)
    again.stop()
    assert key_file.read_text().strip() == secret, "a restart made a new admin key"


def test_keys_cannot_be_managed_where_auth_is_off(mesh):
    """Without auth every caller has every scope: making keys there would hand out ADMIN keys to anyone."""
    for call, request in [
        (mesh.admin.CreateApiKey, gpb.CreateApiKeyRequest(name="x", scopes=[gpb.SCOPE_ADMIN])),
        (mesh.admin.ListApiKeys, gpb.ListApiKeysRequest()),
        (mesh.admin.RevokeApiKey, gpb.RevokeApiKeyRequest(id="any")),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "AUTH_ENABLED" in err.value.details()


def test_missing_bad_and_wrong_scope_keys(mesh, secured):
    predictor = predictor_pb2_grpc.PredictorStub(secured.channels[0])
    admin = gateway_pb2_grpc.GatewayAdminStub(secured.channels[0])
    request = predict_request(f"{mesh.model}@production", X)
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (_bearer("nope.nope"), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-api-key", "bad"),), grpc.StatusCode.UNAUTHENTICATED),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            predictor.Predict(request, metadata=metadata)
        assert err.value.code() == code
    reader = admin.CreateApiKey(
        gpb.CreateApiKeyRequest(name="dashboard", scopes=[gpb.SCOPE_READ]), metadata=_bearer(ADMIN_KEY)
    )
    with pytest.raises(grpc.RpcError) as err:
        predictor.Predict(request, metadata=_bearer(reader.secret))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "PREDICT" in err.value.details()
    status = predictor.ListModels(pb.ListModelsRequest(), metadata=_bearer(reader.secret))
    assert mesh.model in [m.name for m in status.models]
    for rate in (float("inf"), float("nan"), 1e-300, -1.0):  # found by `make fuzz`: every call of the key failed
        with pytest.raises(grpc.RpcError) as err:
            admin.CreateApiKey(
                gpb.CreateApiKeyRequest(name="r", scopes=[gpb.SCOPE_READ], rate_limit=rate), metadata=_bearer(ADMIN_KEY)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rate_limit" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # "List" reads, but the keys are ADMIN's alone
        admin.ListApiKeys(gpb.ListApiKeysRequest(), metadata=_bearer(reader.secret))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        admin.CreateApiKey(gpb.CreateApiKeyRequest(name="x", scopes=[gpb.SCOPE_ADMIN]), metadata=_bearer(reader.secret))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin.RevokeApiKey(gpb.RevokeApiKeyRequest(id=reader.key.id), metadata=_bearer(ADMIN_KEY))
    with pytest.raises(grpc.RpcError) as err:
        predictor.ListModels(pb.ListModelsRequest(), metadata=_bearer(reader.secret))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rate_limit_is_shared_by_every_gateway_instance(mesh, secured):
    admin = gateway_pb2_grpc.GatewayAdminStub(secured.channels[0])
    key = admin.CreateApiKey(
        gpb.CreateApiKeyRequest(name="batch-client", scopes=[gpb.SCOPE_PREDICT], rate_limit=5),
        metadata=_bearer(ADMIN_KEY),
    )
    stubs = [predictor_pb2_grpc.PredictorStub(c) for c in secured.channels]
    request = predict_request(f"{mesh.model}@production", X)
    started = time.monotonic()

    def call(i):
        try:
            stubs[i % 2].Predict(request, metadata=_bearer(key.secret), timeout=30)
            return "ok"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "retry in" in err.details()
            return "limited"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = Counter(pool.map(call, range(40)))
    elapsed = time.monotonic() - started
    allowed = 5 + 5 * elapsed + 1  # the bucket (5) plus what refills while the calls run, across both gateways
    assert outcomes["limited"] > 0
    assert outcomes["ok"] <= allowed, (outcomes, elapsed)


def _watch(channel: grpc.Channel, model: str, secret: str, timeout: float = 60):
    """A WatchEvents call from the first event kept: its first event has come when this returns (it is open)."""
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    call = stub.WatchEvents(
        rpb.WatchEventsRequest(cursor="0", model_name=model), metadata=_bearer(secret), timeout=timeout
    )
    next(call)
    return call


def _web_watch(client: httpx.Client, base: str, model: str, secret: str):
    """The same through the gRPC-Web port: the response (open until closed) and its chunks, the first one read (keep
    them: a dropped iterator closes the response)."""
    body = grpcweb.encode_message(rpb.WatchEventsRequest(cursor="0", model_name=model).SerializeToString())
    headers = {"content-type": "application/grpc-web+proto", "authorization": f"Bearer {secret}"}
    url = f"{base}/modelgrid.registry.v1.ModelRegistry/WatchEvents"
    request = client.build_request("POST", url, content=body, headers=headers)
    response = client.send(request, stream=True)
    chunks = response.iter_bytes()
    assert grpcweb.FrameDecoder().feed(next(chunks))[0].flags == grpcweb.MESSAGE_FLAG
    return response, chunks


def _refused_stream(err: grpc.RpcError, name: str) -> None:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    details = err.details()
    assert f"'{name}'" in details and "MODELGRID_GATEWAY_MAX_STREAMS_PER_CALLER" in details
    assert f"has {STREAMS_PER_CALLER} streaming calls open" in details


def test_a_key_holds_a_bounded_number_of_streams_across_both_ports_and_gets_them_back(mesh, secured):
    """One key cannot take every stream of the mesh: past its limit (3 here) its next stream, on either port of a
    gateway, is RESOURCE_EXHAUSTED, while other keys go on; a stream that ends, however it ends (cancelled by the
    client, deadline, a browser gone), gives its slot back."""
    admin = gateway_pb2_grpc.GatewayAdminStub(secured.channels[0])
    greedy, patient = (
        admin.CreateApiKey(
            gpb.CreateApiKeyRequest(name=name, scopes=[gpb.SCOPE_READ]), metadata=_bearer(ADMIN_KEY)
        ).secret
        for name in ("greedy", "patient")
    )
    channel = secured.channels[0]
    with httpx.Client(timeout=30) as web:
        browser, _chunks = _web_watch(web, secured.web[0], mesh.model, greedy)
        native = [_watch(channel, mesh.model, greedy) for _ in range(STREAMS_PER_CALLER - 1)]
        with pytest.raises(grpc.RpcError) as err:
            _watch(channel, mesh.model, greedy)
        _refused_stream(err.value, "greedy")
        watch = rpb.WatchEventsRequest(cursor="0", model_name=mesh.model)
        _, messages, trailers = _web_call(web, secured.web[0], "ModelRegistry/WatchEvents", watch, greedy)
        assert messages == [] and trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        assert "MAX_STREAMS_PER_CALLER" in trailers["grpc-message"]
        _watch(channel, mesh.model, patient).cancel()  # another key is not starved
        _watch(secured.channels[1], mesh.model, greedy).cancel()  # the count is per gateway instance
        predictor = predictor_pb2_grpc.PredictorStub(channel)  # unary calls are not streams
        assert predictor.ListModels(pb.ListModelsRequest(), metadata=_bearer(greedy), timeout=10) is not None

        native.pop().cancel()  # cancelled by the client: its slot comes back
        native.append(_eventually(lambda: _watch(channel, mesh.model, greedy)))
        browser.close()  # the browser leaves
        _eventually(lambda: _watch(channel, mesh.model, greedy, timeout=1.5))  # ...and a deadline ends this one
    for call in native:
        call.cancel()
    for _ in range(3):  # every slot comes back (the deadline's too): the key opens its whole limit again, not more
        calls = [_eventually(lambda: _watch(channel, mesh.model, greedy)) for _ in range(STREAMS_PER_CALLER)]
        with pytest.raises(grpc.RpcError) as err:
            _watch(channel, mesh.model, greedy)
        _refused_stream(err.value, "greedy")
        for call in calls:
            call.cancel()


def _eventually(opening, seconds: float = 10):
    """What `opening()` returns once the gateway has given the slots of ended streams back."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return opening()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _web_call(client: httpx.Client, base: str, method: str, request, secret: str):
    """One gRPC-Web call of "<Service>/<Method>" in modelgrid.registry.v1: (response, messages, trailers)."""
    response = client.post(
        f"{base}/modelgrid.registry.v1.{method}",
        content=grpcweb.encode_message(request.SerializeToString()),
        headers={"content-type": "application/grpc-web+proto", "authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 200, response.text
    frames = grpcweb.decode_frames(response.content)
    return response, [f.payload for f in frames[:-1]], grpcweb.decode_trailers(frames[-1].payload)


def test_results_through_the_gateway_are_the_models(mesh):
    reply = mesh.predictor.Predict(predict_request(f"{mesh.model}:1", X), timeout=30)
    direct = predictor_pb2_grpc.PredictorStub(mesh.predictors[0].channel())
    expected = direct.Predict(predict_request(f"{mesh.model}:1", X), timeout=30)
    np.testing.assert_array_equal(tensor_to_array(reply.outputs["y"]), tensor_to_array(expected.outputs["y"]))


def test_the_command_line_reaches_every_service_through_one_gateway_with_its_key(mesh, secured, capsys):
    from services.cli.main import run

    admin = gateway_pb2_grpc.GatewayAdminStub(secured.channels[0])
    key = admin.CreateApiKey(
        gpb.CreateApiKeyRequest(name="cli-user", scopes=[gpb.SCOPE_READ, gpb.SCOPE_PREDICT]),
        metadata=_bearer(ADMIN_KEY),
    )
    target = secured.gateways[0].target
    (mesh.tmp / "x.json").write_text("[[0.5, -1.0, 2.0, 0.1]]")
    predict = ["predict", f"{mesh.model}@production", "--input", str(mesh.tmp / "x.json"), "--json"]
    assert run(["--target", target, "--api-key", key.secret, *predict]) == 0
    assert str(json.loads(capsys.readouterr().out)["version"]) == "1"
    assert run(["--target", target, "--api-key", key.secret, "models", "list"]) == 0
    assert mesh.model in capsys.readouterr().out
    assert run(["--target", target, "models", "list"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
