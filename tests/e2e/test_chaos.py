"""Chaos: infrastructure faults against a whole local mesh, which must heal without a service restart.

The module runs its own Consul agent and Redis server (so that it can kill them) and a registry, two predictors, a
worker agent, the trainer and the gateway. Each test breaks one thing with kill -9 while a bounded loop of
predictions runs through the gateway, brings it back, and measures how long the mesh took to be whole again:

- Consul: every service registered again within 10 s of the agent's return, zero failed predictions;
- Redis: the registry answers within 5 s of Redis's return, predictions go on, followers resume from their cursor;
- the registry: predictions go on from what the predictors loaded, writes fail UNAVAILABLE, and succeed again
  once it is back;
- Consul under a training job: the job trains on, with no restart (its worker agent is held, not lost).
"""

import time
from collections.abc import Callable
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.registry.v1 import registry_pb2_grpc
from modelgrid.trainer.v1 import trainer_pb2 as tpb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.kit.localinfra import ConsulAgent, RedisServer, redis_ping

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
REGISTERED_AGAIN_WITHIN_S = 10.0
REGISTRY_ANSWERS_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, tmp_path_factory, launch, client_for, unique, build_saved_model):
    tmp = tmp_path_factory.mktemp("chaos")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul, RedisServer(tmp / "redis") as redis:
        try:
            registry = launch.registry(consul.http_url, redis.url, tmp / "reg")
            channel, client = client_for(registry)
            model = unique("chaos")
            client.ensure_model(model)
            for seed in (1, 2):
                client.push_savedmodel(model, build_saved_model(tmp / f"m{seed}", seed=seed))
            client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
            with launch.together():
                predictors = [
                    launch.predictor(consul.http_url, redis.url, tmp / f"p{i}", [], AUTO_LOAD="true") for i in range(2)
                ]
                agent = launch.agent(consul.http_url, tmp)
                gateway = launch.gateway(consul.http_url, redis.url, tmp)
            trainer = launch.trainer(consul.http_url, redis.url, tmp / "trainer", f"mg:chaos:{unique('t')}:")
            gateway_channel = grpc.insecure_channel(gateway.target)
            ns = SimpleNamespace(
                tmp=tmp,
                consul=consul,
                redis=redis,
                registry=registry,
                client=client,
                model=model,
                services=[registry, *predictors, agent, gateway, trainer],
                gateway=gateway,
                predictor=predictor_pb2_grpc.PredictorStub(gateway_channel),
                registry_via_gateway=registry_pb2_grpc.ModelRegistryStub(gateway_channel),
                trainer=trainer_pb2_grpc.TrainerStub(gateway_channel),
                admin=gateway_pb2_grpc.GatewayAdminStub(gateway_channel),
            )
            wait_for(lambda: both_predictors_route(ns), timeout=60, what="both predictors serving the model")
            yield ns
        finally:
            launch.stop_all()  # before the agent and Redis go away


def predict(ns, alias: str = "production") -> pb.PredictResponse:
    request = pb.PredictRequest(model=ref_to_pb(f"{ns.model}@{alias}"), inputs={"x": array_to_tensor(X)})
    return ns.predictor.Predict(request, timeout=10)


def both_predictors_route(ns) -> bool:
    try:
        routes = {r.service: list(r.upstreams) for r in ns.admin.GetRoutes(gpb.GetRoutesRequest(), timeout=5).routes}
    except grpc.RpcError:
        return False
    upstreams = routes.get("predictor", [])
    return len(upstreams) == 2 and all(f"model={ns.model}" in u.tags for u in upstreams)


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Polls until condition() holds; returns the seconds it took. Fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - started


def passing_ids(ns) -> set[str]:
    """Ids of every service instance the agent holds with all its checks passing."""
    admin = {"X-Consul-Token": ns.consul.master_token}  # Consul's ACLs deny an anonymous read
    try:
        checks = httpx.get(f"{ns.consul.http_url}/v1/agent/checks", headers=admin, timeout=2).json()
        services = httpx.get(f"{ns.consul.http_url}/v1/agent/services", headers=admin, timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return set()
    failing = {c["ServiceID"] for c in checks.values() if c["Status"] != "passing"}
    return {service_id for service_id in services if service_id not in failing}


def test_consul_kill_9_and_restart(mesh, prediction_loop):
    wait_for(lambda: len(passing_ids(mesh)) == len(mesh.services), timeout=30, what="every service passing")
    before = passing_ids(mesh)
    with prediction_loop(lambda: predict(mesh)) as loop:
        time.sleep(1)
        mesh.consul.kill()
        time.sleep(3)  # the outage: predictions go on over the gateway's last routes
        mesh.consul.start()
        back = time.monotonic()
        registered_again = {}
        while set(registered_again) != before:
            assert time.monotonic() - back < 30, f"still missing: {before - set(registered_again)}"
            for service_id in passing_ids(mesh) - set(registered_again):
                registered_again[service_id] = time.monotonic() - back
            time.sleep(0.1)
        wait_for(lambda: both_predictors_route(mesh), timeout=10, what="the gateway routes to both predictors")
        time.sleep(2)
    slowest = max(registered_again.values())
    print(f"\nConsul restart: every service registered again {slowest:.2f}s after the agent answered; ", end="")
    print(f"{loop.calls()} predictions through the gateway, failures {dict(loop.failures())}")
    assert slowest < REGISTERED_AGAIN_WITHIN_S
    assert loop.calls() > 50
    assert not loop.failures()


def test_redis_kill_9_and_restart(mesh, prediction_loop):
    with prediction_loop(lambda: predict(mesh)) as loop:
        time.sleep(1)
        mesh.redis.kill()
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as failed:
            mesh.registry_via_gateway.SetAlias(
                rpb.SetAliasRequest(model_name=mesh.model, alias="staging", version=2), timeout=20
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert "state store (Redis)" in failed.value.details()  # what is down, not "no healthy instance"
        time.sleep(2)
        mesh.redis.start()
        back = time.monotonic()
        assert redis_ping("127.0.0.1", mesh.redis.port, password=mesh.redis.password)
        took = wait_for(lambda: _registry_answers(mesh), timeout=30, what="the registry answering")
        time.sleep(1)
    print(f"\nRedis restart: the registry answered {took:.2f}s after Redis did; ", end="")
    print(f"{loop.calls()} predictions through the gateway, failures {dict(loop.failures())}")
    assert took < REGISTRY_ANSWERS_WITHIN_S
    assert not loop.failures()
    # The predictors' event followers resumed: an alias move made now reaches every predictor.
    mesh.client.stub.SetAlias(rpb.SetAliasRequest(model_name=mesh.model, alias="production", version=2))
    wait_for(lambda: _all_answer_with(mesh, 2), timeout=30, what="predictions from version 2 after the move")
    assert time.monotonic() - back < 60


def test_registry_kill_9_and_restart(mesh, prediction_loop):
    with prediction_loop(lambda: predict(mesh)) as loop:
        time.sleep(1)
        mesh.registry.kill()
        with pytest.raises(grpc.RpcError) as failed:
            mesh.registry_via_gateway.ListModels(rpb.ListModelsRequest(), timeout=20)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        time.sleep(3)  # the predictors serve what they loaded
        mesh.registry.start()
        took = wait_for(lambda: _registry_answers(mesh), timeout=30, what="the registry through the gateway")
        time.sleep(1)
    print(f"\nRegistry restart: answering through the gateway {took:.2f}s after it served; ", end="")
    print(f"{loop.calls()} predictions through the gateway, failures {dict(loop.failures())}")
    assert not loop.failures()
    mesh.client.stub.SetAlias(rpb.SetAliasRequest(model_name=mesh.model, alias="production", version=1))
    wait_for(lambda: _all_answer_with(mesh, 1), timeout=30, what="predictions from version 1 after the move")


def test_a_training_job_trains_on_across_a_consul_restart(mesh, digits_spec, unique):
    name = unique("chaos-trained")
    spec = digits_spec(workers=1, register_model=name)
    job = mesh.trainer.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
    _wait_job(mesh, job.id, lambda j: j.state == tpb.JOB_STATE_RUNNING, timeout=120)
    mesh.consul.kill()
    time.sleep(3)
    mesh.consul.start()
    done = _wait_job(mesh, job.id, lambda j: j.state in FINAL_JOB_STATES, timeout=240)
    assert tpb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED", done.message
    assert (done.attempt, done.restarts) == (1, 0), "the job was restarted: its agent was taken for lost"
    assert done.registered_version == 1


FINAL_JOB_STATES = {tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED}


def _wait_job(ns, job_id: str, predicate, *, timeout: float) -> tpb.Job:
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = ns.trainer.GetJob(tpb.GetJobRequest(id=job_id), timeout=10)
            if predicate(job):
                return job
            if job.state in FINAL_JOB_STATES:
                raise AssertionError(f"job ended {tpb.JobState.Name(job.state)} while waiting: {job.message}")
        except grpc.RpcError as err:
            # Only while Consul restarts and the gateway re-resolves: then an answer again.
            print(f"GetJob through the gateway: {err.code().name} {err.details()}")
        assert time.monotonic() < deadline, f"job {job_id} not there within {timeout}s"
        time.sleep(0.5)


def _registry_answers(ns) -> bool:
    try:
        ns.registry_via_gateway.ListModels(rpb.ListModelsRequest(), timeout=2)
        return True
    except grpc.RpcError:
        return False


def _all_answer_with(ns, version: int) -> bool:
    """True when ten predictions in a row (spread over both predictors by the gateway) come from `version`."""
    return all(predict(ns).version == version for _ in range(10))
