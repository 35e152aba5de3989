"""The standard OTEL_* variables on a real service: spans reach a real OTLP receiver under OTEL_SERVICE_NAME, a
ratio sampler of 0 exports nothing, and the service's log lines carry the trace ids of the calls they belong to."""

import json
import time
from pathlib import Path

import pytest

from services.kit.processes import ServiceProcess

pytestmark = pytest.mark.slow


def traced_registry(launch, consul, redis_server, data_dir: Path, collector_port: int, **otel: str) -> ServiceProcess:
    """A registry configured only through the standard OTEL_* variables (no MODELGRID_*_OTEL_* setting)."""
    with pytest.MonkeyPatch.context() as env:  # the launched process inherits these
        env.setenv("OTEL_TRACES_EXPORTER", "otlp")
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector_port}")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        for key, value in otel.items():
            env.setenv(key, value)
        return launch.registry(consul.http_url, redis_server.url, data_dir, LOG_FORMAT="json")


@pytest.fixture(scope="module")
def registries(launch, consul, redis_server, tmp_path_factory, otlp_collector):
    tmp = tmp_path_factory.mktemp("telemetry")
    sampled = traced_registry(
        launch, consul, redis_server, tmp / "sampled", otlp_collector.port, OTEL_SERVICE_NAME="registry-eu"
    )
    unsampled = traced_registry(
        launch,
        consul,
        redis_server,
        tmp / "unsampled",
        otlp_collector.port,
        OTEL_SERVICE_NAME="registry-quiet",
        OTEL_TRACES_SAMPLER="traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
    )
    yield sampled, unsampled, tmp
    sampled.stop()
    unsampled.stop()


def push_one(process: ServiceProcess, client_for, name: str, tmp: Path) -> None:
    artifact = tmp / f"{name}.bin"
    artifact.write_bytes(b"modelgrid telemetry test artifact")
    channel, client = client_for(process)
    with channel:
        client.ensure_model(name)
        client.push_file(name, artifact)


def logged_trace_ids(log: Path, text: str) -> set[str]:
    """Trace ids of the JSON log lines whose message contains `text`."""
    ids = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if text in entry["msg"] and entry.get("trace_id"):
                ids.add(entry["trace_id"])
    return ids


def test_spans_go_where_the_standard_variables_say_under_otel_service_name(registries, otlp_collector, client_for):
    sampled, unsampled, tmp = registries
    push_one(sampled, client_for, "traced-model", tmp)
    push_one(unsampled, client_for, "quiet-model", tmp)
    deadline = time.monotonic() + 30
    while not any(s.service == "registry-eu" and s.name.endswith("/CreateVersion") for s in otlp_collector.spans):
        assert time.monotonic() < deadline, {s.service for s in otlp_collector.spans}
        time.sleep(0.2)
    time.sleep(1.0)  # what the unsampled registry would have exported by now (it exports every 100 ms)
    services = {s.service for s in otlp_collector.spans}
    assert "registry" not in services  # OTEL_SERVICE_NAME named it
    assert "registry-quiet" not in services  # the ratio sampler at 0 sampled nothing

    # The log line of the commit carries the trace id of the CreateVersion call it was written in.
    create = {s.trace_id for s in otlp_collector.spans if s.service == "registry-eu" and "CreateVersion" in s.name}
    ids = logged_trace_ids(sampled.log_path, "traced-model:1 committed")
    assert ids and ids <= create, (ids, create)
    # Unsampled calls still have a trace id, so their lines can be found by it too.
    assert logged_trace_ids(unsampled.log_path, "quiet-model:1 committed")
