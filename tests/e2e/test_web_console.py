"""The web console from a real browser: headless Debian Chromium, driven by playwright-core
(web/tests/console.e2e.mjs), loads the built console from the gateway's web port and talks gRPC-Web through it to a
real registry, predictor, trainer and the gateway's own API: lists models, promotes and rolls back, predicts,
compares versions' metrics, sets and rolls back a canary weight, runs a bulk job and reads its results, shows what
each replica serves, manages API keys, submits and cancels training jobs, and watches one stream its progress and
logs. What the browser did is checked here through the gateway's gRPC port."""

import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import yaml
from google.protobuf import json_format

from modelgrid.common.v1 import common_pb2
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.registry.v1 import registry_pb2_grpc
from modelgrid.trainer.v1 import trainer_pb2 as tpb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.cli.channels import open_channel
from services.kit.localinfra import ConsulAgent, free_port
from services.kit.processes import REPO_ROOT, ServiceProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
WEB = REPO_ROOT / "web"
SCRIPT = WEB / "tests" / "console.e2e.mjs"
X = [[1.0, 2.0, 3.0, 4.0]]
BATCH_RECORDS = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]]
METRICS = {"1": {"accuracy": 0.9, "loss": 0.3}, "2": {"accuracy": 0.95, "loss": 0.2}}
CANARY_WEIGHT_TAG = "modelgrid.canary-weight"
ADMIN_KEY = f"admin.console-e2e-{uuid.uuid4().hex}"


def _require_browser() -> None:
    """Chromium, node and the built console are set up by `make test` (make setup): missing ones fail the test,
    except for Chromium outside CI, where the test is skipped."""
    if not os.path.exists(CHROMIUM):
        if not os.environ.get("CI"):
            pytest.skip(f"{CHROMIUM} is missing (make setup installs Debian's chromium)")
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package")
    if shutil.which("node") is None:
        pytest.fail("node is missing: the console test runs playwright-core with Node.js")
    if not (WEB / "dist" / "index.html").is_file() or not (WEB / "node_modules" / "playwright-core").is_dir():
        pytest.fail("the web console is not built: run `make web`")


def _wait(what: str, check, timeout: float = 60.0):
    """Polls `check()` until it returns something truthy (RPC errors count as not yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except grpc.RpcError as err:
            last = err.code()
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, tf_reference):
    """Own Consul; a registry, a predictor serving every model, two worker agents, a trainer and a gateway with its
    web front serving web/dist; a model with versions 1 (production) and 2."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("web")
    started: list[ServiceProcess] = []
    channel: grpc.Channel | None = None
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        try:
            registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
            started.append(registry)
            registry_channel, client = client_for(registry)
            model = unique("console")
            client.ensure_model(model, description="pushed by the web console test")
            paths = [build_saved_model(tmp / f"model-{seed}", seed=seed) for seed in (7, 8)]
            for version, path in enumerate(paths, start=1):
                client.push_savedmodel(model, path, metrics=METRICS[str(version)])
            client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
            registry_channel.close()
            prefix = f"mg:test-web:{uuid.uuid4().hex[:6]}:"
            web_port = free_port()
            gateway_settings = {
                "CONSUL_URL": consul.http_url,
                "REDIS_URL": redis_server.url,
                "REDIS_KEY_PREFIX": f"mg:test-web-gw:{uuid.uuid4().hex[:6]}:",
                "CONSUL_CHECK_INTERVAL": "1s",
                "WEB_PORT": str(web_port),
                "METRICS_PORT": "0",
                "WEB_DIR": str(WEB / "dist"),
                "CORS_ORIGINS": '["*"]',
                "ADMIN_KEY": ADMIN_KEY,  # auth as by default: on
            }
            gateway = ServiceProcess(
                "services.gateway",
                "MODELGRID_GATEWAY_",
                gateway_settings,
                tmp / "gateway.log",
                internal_tls_dir=internal_tls_dir,
            )
            with launch.together():
                started.append(launch.predictor(consul.http_url, redis_server.url, tmp, [], AUTO_LOAD="true"))
                started += [launch.agent(consul.http_url, tmp) for _ in range(2)]
                started.append(launch.trainer(consul.http_url, redis_server.url, tmp, prefix))
                started.append(launch.start(gateway))
            channel = open_channel(gateway.target, [], ADMIN_KEY)
            ns = SimpleNamespace(
                tmp=tmp,
                model=model,
                reference=tf_reference(paths[0]),
                url=f"http://127.0.0.1:{web_port}",
                trainer=trainer_pb2_grpc.TrainerStub(channel),
                predictor=predictor_pb2_grpc.PredictorStub(channel),
                registry=registry_pb2_grpc.ModelRegistryStub(channel),
                admin=gateway_pb2_grpc.GatewayAdminStub(channel),
                target=gateway.target,
                logs=[p.log_path for p in started],
            )
            _wait_routed(ns)
            yield ns
        finally:
            if channel is not None:
                channel.close()
            for process in reversed(started):
                process.stop()


def _wait_routed(ns) -> None:
    """Until the gateway reaches every backend: both agents, both versions of the model loaded."""
    _wait("two worker agents", lambda: len(ns.trainer.ListWorkers(tpb.ListWorkersRequest()).workers) == 2)

    def served() -> bool:
        status = ns.predictor.GetModelMetadata(ppb.GetModelMetadataRequest(name=ns.model))
        available = {v.version for v in status.versions if v.state == ppb.VERSION_STATE_AVAILABLE}
        return {1, 2} <= available

    _wait("the predictor to serve versions 1 and 2", served, timeout=120)


class ConsoleScript:
    """web/tests/console.e2e.mjs as a subprocess whose output lines are read as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        self.process = subprocess.Popen(["node", str(SCRIPT)], cwd=WEB, env={**os.environ, **env}, text=True, **pipes)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, marker: str, timeout: float) -> str:
        """Reads lines until one starts with `marker` and returns it; fails on the script's end or the timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"console script ended before {marker!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if line.startswith(marker):
                return line
        raise AssertionError(f"no {marker!r} within {timeout}s:\n" + "\n".join(self.lines))

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _log_tails(ns) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}" for path in ns.logs)


def _production_answers(mesh, version: int) -> None:
    """Until a call on NAME@production through the gateway is answered by `version` (the gateway follows the canary
    weight, and the predictor the canary alias, through the registry's event stream)."""
    x = np.array(X, np.float32)
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=x.shape, raw_data=x.tobytes())
    request = ppb.PredictRequest(model=common_pb2.ModelRef(name=mesh.model, alias="production"), inputs={"x": tensor})
    _wait(f"production calls answered by version {version}", lambda: mesh.predictor.Predict(request).version == version)
    # and they stay there: a weight of 1 (or 0) leaves no share to chance
    assert {mesh.predictor.Predict(request).version for _ in range(10)} == {version}


def _check_canary(mesh, weight: str, version: int) -> None:
    model = mesh.registry.GetModel(rpb.GetModelRequest(name=mesh.model))
    assert model.tags[CANARY_WEIGHT_TAG] == weight, dict(model.tags)
    assert model.aliases["canary"] == 2 and model.aliases["production"] == 1, dict(model.aliases)
    _production_answers(mesh, version)


def _key_code(mesh, secret: str, call) -> grpc.StatusCode:
    """The status of `call(channel)` made with the API key `secret` on the gateway's gRPC port."""
    with open_channel(mesh.target, [], secret) as channel:
        try:
            call(channel)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _list_models(channel) -> None:
    registry_pb2_grpc.ModelRegistryStub(channel).ListModels(rpb.ListModelsRequest())


def _list_keys(channel) -> None:
    gateway_pb2_grpc.GatewayAdminStub(channel).ListApiKeys(gpb.ListApiKeysRequest())


def test_console_in_chromium_drives_every_page_against_the_mesh(mesh, digits_spec, unique):
    expected = mesh.reference(np.array(X, dtype=np.float32))[0].tolist()
    batch_expected = mesh.reference(np.array(BATCH_RECORDS, dtype=np.float32)).tolist()
    # The job the console submits (as YAML) and follows: slow steps, so that the browser sees them arrive live.
    spec = digits_spec(step_delay_ms=60, register_model=unique("console-trained"))
    spec.hyper_parameters.epochs = 4
    # One it submits as JSON and cancels: more workers than the two one-slot agents, so it waits for slots.
    cancel_spec = digits_spec(name="console-cancel", workers=3)
    screenshots = mesh.tmp / "screenshots"
    screenshots.mkdir()
    script = ConsoleScript(
        {
            "CONSOLE_URL": mesh.url,
            "API_KEY": ADMIN_KEY,
            "MODEL_NAME": mesh.model,
            "EXPECTED_Y": json.dumps(expected),
            "EXPECTED_METRICS": json.dumps(METRICS),
            "BATCH_RECORDS": json.dumps(BATCH_RECORDS),
            "BATCH_EXPECTED_Y": json.dumps(batch_expected),
            "JOB_SPEC_YAML": yaml.safe_dump(json_format.MessageToDict(spec, preserving_proto_field_name=True)),
            "CANCEL_SPEC_JSON": json_format.MessageToJson(cancel_spec),
            "SCREENSHOT_DIR": str(screenshots),
            "CHROMIUM": CHROMIUM,
        }
    )
    try:
        script.wait_for("CHECKPOINT canary-set", timeout=180)
        _check_canary(mesh, "1", version=2)  # every production call goes to the canary
        script.send("checked")
        script.wait_for("CHECKPOINT canary-rolled-back", timeout=60)
        _check_canary(mesh, "0", version=1)
        script.send("checked")

        _, _, key_id, secret = script.wait_for("CHECKPOINT key-created", timeout=120).split()
        # The key the page made works, with the READ scope it was given and no more.
        assert _key_code(mesh, secret, _list_models) == grpc.StatusCode.OK
        assert _key_code(mesh, secret, _list_keys) == grpc.StatusCode.PERMISSION_DENIED
        script.send("checked")
        script.wait_for("CHECKPOINT key-revoked", timeout=60)
        _wait("the revoked key to be refused", lambda: _key_code(mesh, secret, _list_models) != grpc.StatusCode.OK)
        assert _key_code(mesh, secret, _list_models) == grpc.StatusCode.UNAUTHENTICATED
        keys = {key.id: key for key in mesh.admin.ListApiKeys(gpb.ListApiKeysRequest()).keys}
        assert keys[key_id].revoked and list(keys[key_id].scopes) == [gpb.SCOPE_READ]
        script.send("checked")
        code = script.finish(timeout=420)
    except BaseException:
        script.kill()
        print("\n".join(script.lines))
        raise
    output = "\n".join(script.lines)
    print(output)
    assert code == 0, f"console script failed:\n{output}\n{_log_tails(mesh)}"
    checkpoints = [line.split()[1] for line in script.lines if line.startswith("CHECKPOINT ")]
    expected_checkpoints = (
        "asked-for-key models-listed promoted rolled-back predicted error-shown workers-listed compared canary-set "
        "canary-rolled-back batch-fetched serving-listed key-created keys-denied key-revoked spec-refused "
        "job-cancelled job-submitted job-progress job-succeeded job-logs jobs-listed done"
    )
    assert checkpoints == expected_checkpoints.split(), output
    assert "version=1" in output
    assert (screenshots / "job.png").stat().st_size > 0
    detail = {line.split()[1]: line.split()[2:] for line in script.lines if line.startswith("CHECKPOINT ")}

    # The bulk job the page ran: on version 1, every record.
    batch = mesh.predictor.GetBatchJob(ppb.GetBatchJobRequest(id=detail["batch-fetched"][0]))
    assert batch.state == ppb.BATCH_JOB_STATE_SUCCEEDED and batch.version == 1 and batch.total_records == 3
    # The replica the serving page showed is the one the gateway routes predictions to.
    routes = mesh.admin.GetRoutes(gpb.GetRoutesRequest()).routes
    predictors = {u.target for r in routes if r.service == "predictor" for u in r.upstreams}
    assert detail["serving-listed"] == [next(iter(predictors))] and len(predictors) == 1
    # The job cancelled from its page, and the one submitted from YAML, as the trainer has them.
    cancelled = mesh.trainer.GetJob(tpb.GetJobRequest(id=detail["job-cancelled"][0]))
    assert cancelled.state == tpb.JOB_STATE_CANCELLED and cancelled.spec.name == "console-cancel"
    final = mesh.trainer.GetJob(tpb.GetJobRequest(id=detail["job-submitted"][0]))
    assert final.state == tpb.JOB_STATE_SUCCEEDED and final.registered_version == 1
    assert final.spec.register_model == spec.register_model and final.spec.hyper_parameters == spec.hyper_parameters
    assert final.spec.step_delay_ms == 60 and final.spec.recipe_params == spec.recipe_params
    logs = mesh.trainer.GetJobLogs(tpb.GetJobLogsRequest(id=final.id, task_index=-1)).logs
    assert sorted(log.task_index for log in logs) == [0, 1] and all(log.lines for log in logs)
