"""Every service's /metrics, scraped over HTTP from one real mesh (registry, predictor, worker agent, trainer,
gateway): the RPC metrics of one label scheme move with real calls, the scrape-time gauges hold sane values, every
metric the Grafana dashboard queries exists, and the Prometheus scrape config names the ports `make up` uses."""

import importlib.util
import json
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modelgrid.agent.v1 import agent_pb2, agent_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.registry.v1 import registry_pb2_grpc
from modelgrid.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.kit.localinfra import ConsulAgent, free_port, service_token
from services.kit.processes import REPO_ROOT, ServiceProcess

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
AGENT_SLOTS = 2
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "modelgrid.json"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS_COMPOSE = REPO_ROOT / "deploy" / "prometheus" / "prometheus-compose.yml"
COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"
HANDLED = "modelgrid_rpc_server_handled_total"


def _agent(launch, consul_url: str, data_dir: Path) -> ServiceProcess:
    """A worker agent with AGENT_SLOTS slots and a metrics port (launch.agent takes no extra settings)."""
    name = f"agent-{uuid.uuid4().hex[:6]}"
    env = {
        "CONSUL_URL": consul_url,
        "CONSUL_TOKEN": service_token(consul_url, "trainer-agent"),
        "SLOTS": str(AGENT_SLOTS),
        "WORK_DIR": str(data_dir / name),
        "CONSUL_CHECK_INTERVAL": "1s",
        "METRICS_PORT": str(free_port()),
    }
    process = ServiceProcess(
        "services.trainer.agent",
        "MODELGRID_AGENT_",
        env,
        data_dir / f"{name}.log",
        internal_tls_dir=launch.internal_tls_dir,
    )
    return launch.start(process)


@pytest.fixture(scope="module")
def mesh(
    internal_tls_dir,
    redis_server,
    tmp_path_factory,
    launch,
    client_for,
    unique,
    build_saved_model,
    predict_request,
    until_routed,
):
    tmp = tmp_path_factory.mktemp("metrics")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        prefix = f"mg:test-metrics:{uuid.uuid4().hex[:6]}:"
        with launch.together():
            registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg", METRICS_PORT=str(free_port()))
            agent = _agent(launch, consul.http_url, tmp)
            trainer = launch.trainer(consul.http_url, redis_server.url, tmp, prefix, METRICS_PORT=str(free_port()))
        channel, client = client_for(registry)
        model = unique("metrics")
        client.ensure_model(model)
        client.push_savedmodel(model, build_saved_model(tmp / "m1", seed=1))
        with launch.together():
            predictor = launch.predictor(consul.http_url, redis_server.url, tmp / "p", [{"name": model}], PROCESSES="1")
            gateway = launch.gateway(
                consul.http_url, redis_server.url, tmp, PROCESSES="1", METRICS_PORT=str(free_port())
            )
        ports = {
            "registry": registry.env["MODELGRID_REGISTRY_METRICS_PORT"],
            "agent": agent.env["MODELGRID_AGENT_METRICS_PORT"],
            "trainer": trainer.env["MODELGRID_TRAINER_METRICS_PORT"],
            "predictor": predictor.env["MODELGRID_PREDICTOR_METRICS_PORT"],
            "gateway": gateway.env["MODELGRID_GATEWAY_METRICS_PORT"],
        }
        predictor_channel = predictor.channel()
        trainer_channel = trainer.channel()
        agent_channel = agent.channel(identity="trainer")  # an agent accepts only the trainer
        gateway_channel = grpc.insecure_channel(gateway.target)
        try:
            through_gateway = predictor_pb2_grpc.PredictorStub(gateway_channel)
            request = predict_request(model, X)
            assert (
                until_routed(lambda: through_gateway.Predict(request, timeout=30), "the predictor")
                == grpc.StatusCode.OK
            )
            yield SimpleNamespace(
                model=model,
                ports=ports,
                registry=registry_pb2_grpc.ModelRegistryStub(channel),
                registry_channel=channel,
                predictor=predictor_pb2_grpc.PredictorStub(predictor_channel),
                trainer=trainer_pb2_grpc.TrainerStub(trainer_channel),
                agent=agent_pb2_grpc.WorkerAgentStub(agent_channel),
                gateway=predictor_pb2_grpc.PredictorStub(gateway_channel),
            )
        finally:
            for open_channel in (gateway_channel, agent_channel, trainer_channel, predictor_channel, channel):
                open_channel.close()
            for process in (gateway, predictor, trainer, agent, registry):
                process.stop()


class Exposition:
    """One scrape of a service's /metrics."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
        return sum(
            sample.value
            for family in self.families
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            sample.name == name and labels.items() <= sample.labels.items()
            for family in self.families
            for sample in family.samples
        )

    def names(self) -> set[str]:
        """Every series name the exposition declares, samples or not (a counter's _total, a histogram's parts)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
        names = set()
        for family in self.families:
            names.add(family.name)
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
        return names


def scrape(mesh, service: str) -> Exposition:
    response = httpx.get(f"http://127.0.0.1:{mesh.ports[service]}/metrics", timeout=10)
    response.raise_for_status()
    return Exposition(response.text)


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, timeout=30, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _predict(mesh, stub, ref: str, predict_request) -> grpc.StatusCode:
    return _code(stub.Predict, predict_request(ref, X))


# -- RPC metrics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "method", "call"),
    [
        (
            "registry",
            "/modelgrid.registry.v1.ModelRegistry/GetModel",
            lambda mesh: mesh.registry.GetModel(rpb.GetModelRequest(name="no-such-model-here"), timeout=30),
        ),
        (
            "trainer",
            "/modelgrid.trainer.v1.Trainer/GetJob",
            lambda mesh: mesh.trainer.GetJob(trainer_pb2.GetJobRequest(id="no-such-job"), timeout=30),
        ),
    ],
)
def test_a_not_found_call_is_counted_under_its_status_name(mesh, service, method, call):
    labels = {"service": service, "method": method}
    before = scrape(mesh, service)
    with pytest.raises(grpc.RpcError) as err:
        call(mesh)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(mesh, service)
    assert after.value(HANDLED, code="NOT_FOUND", **labels) == before.value(HANDLED, code="NOT_FOUND", **labels) + 1
    count = "modelgrid_rpc_server_handling_seconds_count"
    assert after.value(count, **labels) == before.value(count, **labels) + 1
    assert after.has("modelgrid_rpc_server_in_flight", service=service)


def test_predictions_move_the_rpc_and_the_predictor_metrics_with_the_same_codes(mesh, predict_request):
    method = {"method": "/modelgrid.predictor.v1.Predictor/Predict"}
    requests = "modelgrid_predictor_requests_total"
    before_p, before_g = scrape(mesh, "predictor"), scrape(mesh, "gateway")
    assert _predict(mesh, mesh.predictor, mesh.model, predict_request) == grpc.StatusCode.OK
    assert _predict(mesh, mesh.gateway, mesh.model, predict_request) == grpc.StatusCode.OK
    assert _predict(mesh, mesh.predictor, "no-such-model", predict_request) == grpc.StatusCode.NOT_FOUND
    assert _predict(mesh, mesh.gateway, f"{mesh.model}:99", predict_request) == grpc.StatusCode.NOT_FOUND
    after_p, after_g = scrape(mesh, "predictor"), scrape(mesh, "gateway")

    def moved(before, after, name, **labels) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # The predictor served both OK calls (one direct, one through the gateway) and answered the direct NOT_FOUND.
    assert moved(before_p, after_p, HANDLED, service="predictor", code="OK", **method) == 2
    assert moved(before_p, after_p, HANDLED, service="predictor", code="NOT_FOUND", **method) >= 1
    assert moved(before_p, after_p, requests, model=mesh.model, version="1", code="OK") == 2
    # The gateway counts what it forwarded, in its own metric and in the shared scheme, with the same code names.
    assert moved(before_g, after_g, HANDLED, service="gateway", code="OK", **method) == 1
    assert moved(before_g, after_g, HANDLED, service="gateway", code="NOT_FOUND", **method) == 1
    assert moved(before_g, after_g, "modelgrid_gateway_requests_total", code="NOT_FOUND", **method) == 1
    codes = {s.labels["code"] for f in after_p.families + after_g.families for s in f.samples if "code" in s.labels}
    assert codes <= {c.name for c in grpc.StatusCode}, codes


def test_health_checks_are_not_counted_and_invented_methods_share_one_label(mesh):
    unknown = {"service": "registry", "method": "unknown", "code": "UNIMPLEMENTED"}
    before = scrape(mesh, "registry").value(HANDLED, **unknown)
    invented = mesh.registry_channel.unary_unary(f"/modelgrid.registry.v1.ModelRegistry/Made{uuid.uuid4().hex[:6]}")
    assert _code(invented, b"") == grpc.StatusCode.UNIMPLEMENTED
    assert scrape(mesh, "registry").value(HANDLED, **unknown) == before + 1
    for service in mesh.ports:  # Consul checked each of them every second
        methods = {s.labels.get("method", "") for f in scrape(mesh, service).families for s in f.samples}
        assert not any("grpc.health" in m for m in methods), (service, methods)
        assert not any("Made" in m for m in methods), (service, methods)


def test_an_open_stream_is_in_flight_until_it_ends(mesh):
    def in_flight() -> float:
        return scrape(mesh, "registry").value("modelgrid_rpc_server_in_flight", service="registry")

    before = in_flight()  # the predictor's and the gateway's own event streams
    stream = mesh.registry.WatchEvents(rpb.WatchEventsRequest(), timeout=60)
    try:
        deadline = time.monotonic() + 15
        while in_flight() < before + 1:
            assert time.monotonic() < deadline, "the open stream never showed as in flight"
            time.sleep(0.1)
    finally:
        stream.cancel()
    method = {"service": "registry", "method": "/modelgrid.registry.v1.ModelRegistry/WatchEvents"}
    deadline = time.monotonic() + 15
    while scrape(mesh, "registry").value(HANDLED, code="CANCELLED", **method) < 1:
        assert time.monotonic() < deadline, "the cancelled stream was never counted"
        time.sleep(0.1)
    assert in_flight() == before


# -- gauges -------------------------------------------------------------------------------------------------------


def test_the_predictor_gauges_show_the_loaded_version(mesh):
    metrics = scrape(mesh, "predictor")
    assert metrics.value("modelgrid_predictor_versions", model=mesh.model, state="AVAILABLE") == 1
    assert metrics.value("modelgrid_predictor_versions", model=mesh.model, state="FAILED") == 0
    assert metrics.has("modelgrid_predictor_queue_depth", model=mesh.model, version="1")
    assert metrics.value("modelgrid_predictor_queue_depth", model=mesh.model, version="1") == 0  # nothing waits
    limit = metrics.value("modelgrid_predictor_cache_limit_bytes")
    assert 0 < metrics.value("modelgrid_predictor_cache_used_bytes") <= limit  # the unpacked SavedModel


def test_the_trainer_and_agent_gauges_agree_on_the_slots(mesh):
    deadline = time.monotonic() + 30
    while (trainer := scrape(mesh, "trainer")).value("modelgrid_trainer_agents") != 1:
        assert time.monotonic() < deadline, "the trainer never saw its agent"
        time.sleep(0.2)
    assert trainer.value("modelgrid_trainer_slots", kind="total") == AGENT_SLOTS
    assert trainer.value("modelgrid_trainer_slots", kind="free") == AGENT_SLOTS  # no job runs
    assert trainer.has("modelgrid_trainer_jobs", state="RUNNING")
    assert trainer.value("modelgrid_trainer_jobs") == 0
    agent = scrape(mesh, "agent")
    assert agent.value("modelgrid_agent_slots", kind="total") == AGENT_SLOTS
    assert agent.value("modelgrid_agent_slots", kind="used") == 0
    assert agent.value("modelgrid_agent_worker_processes") == 0
    replicas = mesh.agent.ListReplicas(agent_pb2.ListReplicasRequest(), timeout=30).replicas
    assert len(replicas) == 0
    assert scrape(mesh, "agent").value(HANDLED, service="trainer-agent", code="OK") >= 1


def test_the_gateway_and_registry_gauges(mesh, predict_request):
    assert _predict(mesh, mesh.gateway, mesh.model, predict_request) == grpc.StatusCode.OK  # the pool exists
    gateway = scrape(mesh, "gateway")
    assert gateway.value("modelgrid_gateway_upstream_instances", service="predictor") == 1
    assert gateway.value("modelgrid_gateway_upstream_in_flight", service="predictor") == 0
    registry = scrape(mesh, "registry")
    assert registry.value("modelgrid_registry_staged_uploads") == 0  # the push finished
    total, free = (registry.value("modelgrid_registry_blob_disk_bytes", kind=k) for k in ("total", "free"))
    assert 0 < free <= total


# -- deploy/ cannot drift from the code ---------------------------------------------------------------------------


def _dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\bmodelgrid_[a-z0-9_]+", expr)}


def test_every_metric_the_dashboard_queries_exists(mesh):
    exposed = set().union(*(scrape(mesh, service).names() for service in mesh.ports))
    wanted = _dashboard_metric_names()
    assert len(wanted) >= 15
    assert not wanted - exposed, f"the dashboard queries metrics no service exports: {sorted(wanted - exposed)}"


def _mesh_metrics_ports() -> set[int]:
    """The metrics ports scripts/mesh.py (`make up`) gives its services."""
    spec = importlib.util.spec_from_file_location("modelgrid_local_mesh", REPO_ROOT / "scripts" / "mesh.py")
    local_mesh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_mesh)
    return {service.metrics_port for service in local_mesh.mesh(REPO_ROOT / ".run") if service.metrics_port >= 0}


def _scrape_ports(config_path: Path) -> dict[str, set[int]]:
    config = yaml.safe_load(config_path.read_text())
    ports: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        found = ports.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            found.update(int(target.rsplit(":", 1)[1]) for target in static["targets"])
        found.update(int(sd["port"]) for sd in job.get("dns_sd_configs", []))
        assert found, f"job {job['job_name']} has no target"
    return ports


def test_the_scrape_configs_name_the_ports_the_services_use():
    make_up = _mesh_metrics_ports()
    assert len(make_up) == 7  # registry, two predictors, two agents, trainer, gateway: every service has one
    local = _scrape_ports(PROMETHEUS)
    for job, ports in local.items():
        assert ports <= make_up, f"{job} scrapes {sorted(ports - make_up)}, which `make up` does not use"
    assert set().union(*local.values()) == make_up, "a `make up` metrics port is not scraped"
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    compose_ports = {
        int(value)
        for service in compose.values()
        for key, value in (service.get("environment") or {}).items()
        if key.endswith("_METRICS_PORT")
    }
    assert set().union(*_scrape_ports(PROMETHEUS_COMPOSE).values()) == compose_ports
