"""Replicas of two serving processes on one port (kit.replica). A predictor: one Consul registration, calls that
change what it serves reach both processes, a killed process costs no failed idempotent call, and a hot swap
under load fails no request. A gateway: both fronts (gRPC and gRPC-Web) served by both processes, and a killed
process costs no failed idempotent call. Real Consul, Redis, registry, predictor and gateway processes."""

import itertools
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor, tensor_to_array
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.gateway import grpcweb
from services.kit.consul_acl import TOKEN_ENV
from services.kit.localinfra import ConsulAgent, free_port

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
PROCESSES = 2
CONNECTIONS = 8  # fresh connections per check: each lands on a process the kernel picks
SWITCH_WINDOW_SECONDS = 0.25  # a moved alias: how long two processes may answer from different versions
HELD_SECONDS = 1.5
# What an idempotent caller does (gRPC's own retry policy): a call cut by a process that dies is tried again.
RETRYING = [
    ("grpc.enable_retries", 1),
    # A connection reset while the killed process's socket closes must not park the channel for gRPC's default
    # first reconnect delay (1 s), longer than the retries last.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.use_local_subchannel_pool", 1),  # a connection of its own, not one shared with other channels
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": "modelgrid.predictor.v1.Predictor"}],
                        "retryPolicy": {
                            "maxAttempts": 5,
                            "initialBackoff": "0.05s",
                            "maxBackoff": "1s",
                            "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        ),
    ),
]


def workers_of(pid: int) -> list[int]:
    """The child processes of `pid` (the replica's workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return sorted(children)


def killed_process_costs_no_call(process, channel_of, prediction_loop, ref: str) -> tuple[int, list[str]]:
    """Kills one worker of `process` (a replica) while CONNECTIONS loops call Predict over their own connections;
    returns the calls made and the failures, once the supervisor has started the worker again."""
    before = workers_of(process.process.pid)
    channels = [channel_of() for _ in range(CONNECTIONS)]
    stubs = [predictor_pb2_grpc.PredictorStub(c) for c in channels]
    failed: list[str] = []

    def predict(stub):
        try:
            return stub.Predict(request(ref), timeout=30)
        except grpc.RpcError as err:
            failed.append(f"{err.code().name}: {err.details()}")
            raise

    loops = [prediction_loop(lambda stub=stub: predict(stub)) for stub in stubs]
    try:
        for loop in loops:
            loop.__enter__()
        time.sleep(1.0)
        os.kill(before[0], signal.SIGKILL)

        def replaced() -> bool:
            now = workers_of(process.process.pid)
            return len(now) == PROCESSES and before[0] not in now

        wait_for(replaced, 30, "the supervisor starts the killed process again")
        time.sleep(1.0)
    finally:
        for loop in loops:
            loop.__exit__(None, None, None)
        for channel in channels:
            channel.close()
    return sum(loop.calls() for loop in loops), failed


def mixed_window(results: list[list[tuple[float, str, int]]]) -> float:
    """Seconds from the first version-2 answer on any connection to the last call sent after it that still got
    version 1 (a call was sent after its predecessor on the same connection answered)."""
    first_new = min(done for calls in results for done, _, version in calls if version == 2)
    old_sent_after = [
        previous_done
        for calls in results
        for (previous_done, _, _), (_, _, version) in itertools.pairwise(calls)
        if version == 1 and previous_done > first_new
    ]
    return max(old_sent_after, default=first_new) - first_new


def consul_get(consul: ConsulAgent, path: str):
    headers = {"X-Consul-Token": os.environ.get(TOKEN_ENV, "")}
    return httpx.get(f"{consul.http_url}{path}", headers=headers, timeout=10).json()


def request(ref: str) -> pb.PredictRequest:
    return pb.PredictRequest(model=ref_to_pb(ref), inputs={"x": array_to_tensor(X)})


@pytest.fixture(scope="module")
def replica(
    internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, tf_reference
):
    tmp = tmp_path_factory.mktemp("replica")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        model, extra = unique("swap"), unique("extra")
        refs = {}
        for seed in (1, 2):
            path = build_saved_model(tmp / f"model-{seed}", seed=seed)
            refs[seed] = tf_reference(path)
            client.ensure_model(model)
            client.push_savedmodel(model, path)
        client.ensure_model(extra)
        client.push_savedmodel(extra, tmp / "model-1")
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
        predictor = launch.predictor(
            consul.http_url, redis_server.url, tmp, [{"name": model, "aliases": ["production"]}], PROCESSES="2"
        )
        try:
            yield SimpleNamespace(
                consul=consul, client=client, predictor=predictor, model=model, extra=extra, refs=refs
            )
        finally:
            predictor.stop()
            assert not workers_of(predictor.process.pid), "the replica's workers outlived it"
            channel.close()
            registry.stop()


def fresh_calls(replica, ref: str, count: int = CONNECTIONS) -> list[tuple[str, int]]:
    """(code, version) of one Predict on each of `count` new connections."""
    outcomes = []
    for _ in range(count):
        with replica.predictor.channel(options=RETRYING) as channel:
            try:
                reply = predictor_pb2_grpc.PredictorStub(channel).Predict(request(ref), timeout=30)
                outcomes.append(("OK", reply.version))
            except grpc.RpcError as err:
                outcomes.append((err.code().name, 0))
    return outcomes


def replica_serving(replica, service: str = "predictor") -> bool:
    """Consul's check of the replica (its supervisor's health endpoint) passes."""
    entries = consul_get(replica.consul, f"/v1/health/service/{service}")
    return len(entries) == 1 and all(check["Status"] == "passing" for check in entries[0]["Checks"])


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s"
        time.sleep(0.5)


def test_the_processes_share_one_port_and_one_consul_registration(replica):
    assert len(workers_of(replica.predictor.process.pid)) == PROCESSES
    wait_for(lambda: replica_serving(replica), 60, "the replica passes its Consul check")
    [entry] = consul_get(replica.consul, "/v1/health/service/predictor")
    assert entry["Service"]["Port"] == replica.predictor.port
    assert f"alias={replica.model}@production" in entry["Service"]["Tags"]
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    checked = consul_get(replica.consul, "/v1/agent/checks")[check["CheckID"]]
    assert checked["Status"] == "passing"
    outcomes = fresh_calls(replica, f"{replica.model}@production")
    assert outcomes == [("OK", 1)] * CONNECTIONS
    # One /metrics for the replica, each process's series labelled with its worker.
    port = replica.predictor.env["MODELGRID_PREDICTOR_METRICS_PORT"]
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    executed = " ".join(line for line in metrics.splitlines() if line.startswith("modelgrid_predictor_execution"))
    assert all(f'worker="{i}"' in executed for i in range(PROCESSES)), executed  # warm-ups ran in every process
    answered = [line for line in metrics.splitlines() if line.startswith("modelgrid_predictor_requests_total{")]
    total = sum(float(line.rsplit(" ", 1)[1]) for line in answered if 'code="OK"' in line)
    assert total >= CONNECTIONS  # warm-ups are not requests; these calls are


def test_load_and_unload_reach_every_process(replica):
    with replica.predictor.channel() as channel:
        stub = predictor_pb2_grpc.PredictorStub(channel)
        policy = pb.VersionPolicy(latest=1)
        stub.LoadModel(pb.LoadModelRequest(name=replica.extra, policy=policy, wait=True), timeout=120)
        assert fresh_calls(replica, replica.extra) == [("OK", 1)] * CONNECTIONS
        stub.UnloadModel(pb.UnloadModelRequest(name=replica.extra), timeout=60)
    codes = {code for code, _ in fresh_calls(replica, replica.extra)}
    assert codes == {"NOT_FOUND"}, codes


def test_a_killed_process_costs_no_failed_idempotent_call_and_is_started_again(replica, prediction_loop):
    wait_for(lambda: replica_serving(replica), 60, "the replica passes its Consul check")
    ref = f"{replica.model}@production"
    channel_of = lambda: replica.predictor.channel(options=RETRYING)  # noqa: E731
    calls, failed = killed_process_costs_no_call(replica.predictor, channel_of, prediction_loop, ref)
    assert calls > 50 and not failed, (calls, failed[:3])
    wait_for(lambda: replica_serving(replica), 120, "the replica serves with its new process")
    assert fresh_calls(replica, ref) == [("OK", 1)] * CONNECTIONS


def test_a_hot_swap_under_load_fails_no_request_on_any_process(replica, prediction_loop):
    wait_for(lambda: replica_serving(replica), 120, "the replica passes its Consul check")
    ref = f"{replica.model}@production"
    channels = [replica.predictor.channel(options=RETRYING) for _ in range(CONNECTIONS)]
    stubs = [predictor_pb2_grpc.PredictorStub(c) for c in channels]
    loops = [prediction_loop(lambda stub=stub: stub.Predict(request(ref), timeout=30)) for stub in stubs]
    try:
        for loop in loops:
            loop.__enter__()
        time.sleep(1.0)
        # One process is held still while the alias moves, so that it loads the new version well after the other:
        # the other must wait for it (PREPARED) rather than serve version 2 alone meanwhile.
        slow = workers_of(replica.predictor.process.pid)[0]
        replica.client.stub.SetAlias(rpb.SetAliasRequest(model_name=replica.model, alias="production", version=2))
        os.kill(slow, signal.SIGSTOP)
        try:
            time.sleep(HELD_SECONDS)
        finally:
            os.kill(slow, signal.SIGCONT)
        wait_for(
            lambda: all(loop.results and loop.results[-1][2] == 2 for loop in loops),
            60,
            "every connection's answers come from version 2",
        )
    finally:
        for loop in loops:
            loop.__exit__(None, None, None)
        for channel in channels:
            channel.close()
    failures = [code for loop in loops for _, code, _ in loop.results if code != "OK"]
    assert not failures, failures[:5]
    versions = {version for loop in loops for _, _, version in loop.results}
    assert versions == {1, 2}
    # The processes switch together: once any connection got version 2, a call sent later gets version 1 only
    # within the processes' last poll of each other. Without that wait the window would be the time the held
    # process took to load the new version after the other (more than HELD_SECONDS).
    window = mixed_window([loop.results for loop in loops])
    print(f"old and new version answered side by side for {window * 1000:.0f} ms")
    assert window < SWITCH_WINDOW_SECONDS, window
    assert fresh_calls(replica, ref) == [("OK", 2)] * CONNECTIONS
    with replica.predictor.channel() as channel:
        reply = predictor_pb2_grpc.PredictorStub(channel).Predict(request(ref), timeout=30)
    np.testing.assert_allclose(tensor_to_array(reply.outputs["y"]), replica.refs[2](X), rtol=1e-5)


# ---- a gateway of two processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(replica, redis_server, launch, tmp_path_factory):
    web_port = free_port()
    process = launch.gateway(
        replica.consul.http_url,
        redis_server.url,
        tmp_path_factory.mktemp("gateway"),
        PROCESSES=str(PROCESSES),
        WEB_PORT=str(web_port),
    )
    yield SimpleNamespace(process=process, web=f"http://127.0.0.1:{web_port}")
    process.stop()
    assert not workers_of(process.process.pid), "the gateway's workers outlived it"


def gateway_channel(gateway):
    return grpc.insecure_channel(gateway.process.target, options=RETRYING)


def test_a_gateway_replica_serves_both_fronts_from_every_process(replica, gateway):
    assert len(workers_of(gateway.process.process.pid)) == PROCESSES
    wait_for(lambda: replica_serving(replica, "gateway"), 60, "the gateway replica passes its Consul check")
    [entry] = consul_get(replica.consul, "/v1/health/service/gateway")
    assert entry["Service"]["Port"] == gateway.process.port
    ref = f"{replica.model}@production"
    for _ in range(CONNECTIONS):
        with gateway_channel(gateway) as channel:
            reply = predictor_pb2_grpc.PredictorStub(channel).Predict(request(ref), timeout=30)
            assert reply.version in (1, 2)
        with httpx.Client() as web:  # a connection of its own each time
            answer = web.post(
                f"{gateway.web}/modelgrid.predictor.v1.Predictor/Predict",
                content=grpcweb.encode_message(request(ref).SerializeToString()),
                headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
                timeout=30,
            )
        frames = grpcweb.decode_frames(answer.content)
        assert answer.status_code == 200 and grpcweb.decode_trailers(frames[-1].payload)["grpc-status"] == "0"
        assert pb.PredictResponse.FromString(frames[0].payload).version in (1, 2)


def test_a_killed_gateway_process_costs_no_failed_idempotent_call(replica, gateway, prediction_loop):
    wait_for(lambda: replica_serving(replica, "gateway"), 60, "the gateway replica passes its Consul check")
    ref = f"{replica.model}@production"
    calls, failed = killed_process_costs_no_call(
        gateway.process, lambda: gateway_channel(gateway), prediction_loop, ref
    )
    assert calls > 50 and not failed, (calls, failed[:3])
