"""Fixtures of the security suite: one mesh per module on its own Consul agent and the session's Redis (a registry,
and as the module asks a predictor serving one small model and a trainer), behind a gateway started with its
default auth (API keys on, its admin key made in a file), its gRPC-Web port and its metrics; and one way to call a
method through each door: `direct` (the service's own port), `gateway` (native gRPC) and `web` (gRPC-Web).

A module says what it needs in a module-level `MESH = {"predictor": {...settings}, "trainer": {...},
"registry": {...}, "gateway": {...}}`; a service it does not name is not started (the registry always is).
"""

import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.client.registry import RegistryClient
from modelgrid.client.tensors import array_to_tensor
from modelgrid.common.v1 import common_pb2
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb
from services.gateway import grpcweb
from services.kit.localinfra import ConsulAgent, free_port
from services.kit.processes import REPO_ROOT, ServiceProcess

DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"
_SERVICE_OF = {
    "/modelgrid.registry.v1.": "registry",
    "/modelgrid.predictor.v1.": "predictor",
    "/inference.": "predictor",
    "/tensorflow.serving.": "predictor",
    "/modelgrid.trainer.v1.": "trainer",
    "/modelgrid.gateway.v1.": "gateway",
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status code and message, and the reply messages (raw bytes) it sent first."""

    code: grpc.StatusCode
    details: str
    replies: list[bytes] = field(default_factory=list)
    seconds: float = 0.0

    def assert_code(self, code: grpc.StatusCode, *fragments: str) -> "Outcome":
        assert self.code == code, f"{self.code.name} ({self.details!r}), expected {code.name}"
        for fragment in fragments:
            assert fragment in self.details, f"{fragment!r} not in {self.details!r}"
        return self


def _serialized(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


@dataclass
class Mesh:
    """The services of one module, and calls through each door."""

    tmp: Path
    consul: ConsulAgent
    registry: ServiceProcess
    gateway: ServiceProcess
    predictor: ServiceProcess | None
    trainer: ServiceProcess | None
    admin_key: str
    admin_key_file: Path
    web_port: int
    metrics_port: int
    model: str = ""
    """A model (version 1: the conftest's SavedModel, x float32 [n, 4] -> y [n, 3]) the predictor serves."""
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    # -- channels and addresses ------------------------------------------------------------------------------

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        """Metadata carrying the gateway's admin key."""
        return bearer(self.admin_key)

    @staticmethod
    def bearer(secret: str) -> tuple[tuple[str, str], ...]:
        """Metadata carrying the API key `secret`."""
        return bearer(secret)

    def channel(self, service: str) -> grpc.Channel:
        """A channel to "registry", "predictor", "trainer" or "gateway" (its native port), kept for the module."""
        if service not in self._channels:
            process = getattr(self, service)
            assert process is not None, f"this module started no {service}"
            self._channels[service] = process.channel()  # internal services: mTLS as the operator
        return self._channels[service]

    def channel_for(self, via: str, method: str) -> grpc.Channel:
        if via == "gateway":
            return self.channel("gateway")
        assert via == "direct", via
        return self.channel(next(s for prefix, s in _SERVICE_OF.items() if method.startswith(prefix)))

    def registry_client(self) -> RegistryClient:
        return RegistryClient(self.channel("registry"), client_id="security-suite")

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # -- API keys --------------------------------------------------------------------------------------------

    def make_key(self, name: str, *scopes: int) -> gpb.CreateApiKeyResponse:
        """A new API key (made with the admin key) with these scopes (gpb.SCOPE_*)."""
        admin = gateway_pb2_grpc.GatewayAdminStub(self.channel("gateway"))
        return admin.CreateApiKey(gpb.CreateApiKeyRequest(name=name, scopes=scopes), metadata=self.admin, timeout=10)

    # -- calls through any door ------------------------------------------------------------------------------

    def metadata_for(self, via: str, key: str | None, extra) -> list[tuple[str, str]]:
        """The gateway's doors take the key (the admin key unless `key` says otherwise, "" for none); a service's
        own port knows no keys."""
        metadata = list(extra)
        if via != "direct":
            secret = self.admin_key if key is None else key
            if secret:
                metadata.extend(bearer(secret))
        return metadata

    def unary(
        self, via: str, method: str, request, *, key: str | None = None, metadata=(), timeout: float = 15
    ) -> Outcome:
        """Calls a unary `method` ("/pkg.Service/Method") with `request` (a message, or raw bytes) through `via`
        ("direct", "gateway" or "web"), with `metadata` besides the key."""
        body = _serialized(request)
        if via == "web":
            return self.web_call(method, [body], key=key, metadata=metadata, timeout=timeout)
        call = self.channel_for(via, method).unary_unary(method, request_serializer=None, response_deserializer=None)
        started = time.monotonic()
        try:
            reply = call(body, metadata=self.metadata_for(via, key, metadata), timeout=timeout)
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "", [], time.monotonic() - started)
        return Outcome(grpc.StatusCode.OK, "", [reply], time.monotonic() - started)

    def streamed(
        self,
        via: str,
        method: str,
        requests,
        *,
        kind: str = "stream_stream",
        key: str | None = None,
        timeout: float = 15,
    ) -> Outcome:
        """Calls a streaming `method` (`kind`: "unary_stream", "stream_unary" or "stream_stream"), sending
        `requests` (messages or raw bytes; an iterator may hold the stream open), and reads it to its end."""
        if via == "web":
            return self.web_call(method, [_serialized(r) for r in requests], key=key, timeout=timeout)
        call = getattr(self.channel_for(via, method), kind)(method, request_serializer=None, response_deserializer=None)
        metadata = self.metadata_for(via, key, ())
        started = time.monotonic()
        replies: list[bytes] = []
        try:
            if kind == "unary_stream":
                (request,) = requests
                replies.extend(call(_serialized(request), metadata=metadata, timeout=timeout))
            elif kind == "stream_unary":
                replies.append(call((_serialized(r) for r in requests), metadata=metadata, timeout=timeout))
            else:
                replies.extend(call((_serialized(r) for r in requests), metadata=metadata, timeout=timeout))
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "", replies, time.monotonic() - started)
        return Outcome(grpc.StatusCode.OK, "", replies, time.monotonic() - started)

    def web_call(
        self,
        method: str,
        messages: list[bytes],
        *,
        key: str | None = None,
        metadata=(),
        timeout: float = 15,
        headers: dict[str, str] | None = None,
    ) -> Outcome:
        """One gRPC-Web call (binary mode, HTTP/1.1) on the gateway's web port, its status from the trailer frame."""
        body = b"".join(grpcweb.encode_message(m) for m in messages)
        sent = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **dict(metadata), **(headers or {})}
        sent.update(self.metadata_for("web", key, ()))
        started = time.monotonic()
        response = httpx.post(f"{self.web}{method}", content=body, headers=sent, timeout=timeout + 5)
        assert response.status_code == 200, (response.status_code, response.text)
        frames = grpcweb.decode_frames(response.content)
        assert frames and frames[-1].is_trailers, "the last frame carries the status"
        trailers = grpcweb.decode_trailers(frames[-1].payload)
        code = _CODES[int(trailers["grpc-status"])]
        replies = [f.payload for f in frames[:-1]]
        return Outcome(code, trailers.get("grpc-message", ""), replies, time.monotonic() - started)

    # -- health ----------------------------------------------------------------------------------------------

    def assert_serving(self, *services: str) -> None:
        for service in services:
            stub = health_pb2_grpc.HealthStub(self.channel(service))
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def _routed(mesh: Mesh, via: str, method: str, request, ok: set[grpc.StatusCode]) -> Callable[[], bool]:
    return lambda: mesh.unary(via, method, request, timeout=5).code in ok


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, build_saved_model) -> Path:
    """The conftest's small SavedModel, built once for the suite."""
    return build_saved_model(tmp_path_factory.mktemp("security-model") / "model", seed=3)


def _settings(wanted: dict, service: str, tmp: Path, consul: ConsulAgent) -> dict[str, str]:
    """A module's settings of `service` (a dict, or a function of the module's temporary directory), with the
    service's own Consul ACL token unless they name one."""
    settings = wanted.get(service, {})
    settings = settings(tmp) if callable(settings) else dict(settings)
    if "CONSUL_TOKEN" not in settings:
        settings.setdefault("CONSUL_TOKEN_FILE", str(consul.token_file(service)))
    settings.setdefault("SHUTDOWN_GRACE_SECONDS", "1")  # streams the tests leave open end fast at teardown
    return settings


@pytest.fixture(scope="module")
def mesh(request, internal_tls_dir, redis_server, tmp_path_factory, launch, unique) -> Iterator[Mesh]:
    """The module's mesh (see the module docstring), every door routed and the model served when it returns."""
    wanted = getattr(request.module, "MESH", {})
    tmp = tmp_path_factory.mktemp("security")
    web_port, metrics_port = free_port(), free_port()
    key_file = tmp / "gateway-state" / "admin-key"
    started: list[ServiceProcess] = []
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        url, redis = consul.http_url, redis_server.url
        try:
            with launch.together():
                registry = launch.registry(url, redis, tmp / "registry", **_settings(wanted, "registry", tmp, consul))
                started.append(registry)
                predictor = trainer = None
                if "predictor" in wanted:
                    settings = {
                        "AUTO_LOAD": "true",
                        "WARMUP_REQUESTS": "0",
                        **_settings(wanted, "predictor", tmp, consul),
                    }
                    predictor = launch.predictor(url, redis, tmp / "predictor", [], **settings)
                    started.append(predictor)
                if "trainer" in wanted:
                    prefix = f"mg:security:{uuid.uuid4().hex[:8]}:"
                    settings = _settings(wanted, "trainer", tmp, consul)
                    trainer = launch.trainer(url, redis, tmp / "trainer", prefix, **settings)
                    started.append(trainer)
                settings = {
                    "AUTH_ENABLED": None,  # auth as the gateway has it by default
                    "ADMIN_KEY_FILE": str(key_file),
                    "REDIS_KEY_PREFIX": f"mg:security-gw:{uuid.uuid4().hex[:8]}:",
                    "WEB_PORT": str(web_port),
                    "METRICS_PORT": str(metrics_port),
                    "WEB_DIR": str(tmp / "no-console"),
                    **_settings(wanted, "gateway", tmp, consul),
                }
                gateway = launch.gateway(url, redis, tmp / "gateway", **settings)
                started.append(gateway)
                model = request.getfixturevalue("saved_model") if predictor is not None else None  # meanwhile
            admin_key = key_file.read_text().strip()
            mesh = Mesh(tmp, consul, registry, gateway, predictor, trainer, admin_key, key_file, web_port, metrics_port)
            try:
                if predictor is not None:
                    mesh.model = unique("secmodel")
                    client = mesh.registry_client()
                    client.ensure_model(mesh.model)
                    client.push_savedmodel(mesh.model, model)
                _wait_routed(mesh)
                yield mesh
            finally:
                mesh.close()
        finally:
            _stop_together(started)  # before the Consul agent goes


def _stop_together(processes: list[ServiceProcess]) -> None:
    """SIGTERM to all (the gateway first), then waits for each: their graceful shutdowns overlap."""
    for process in reversed(processes):
        if process.running():
            process.process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            if process.process is not None:
                process.process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_routed(mesh: Mesh) -> None:
    """Until every door reaches every service of the mesh (and the predictor serves the model)."""
    found = {grpc.StatusCode.NOT_FOUND}
    for via in ("direct", "gateway", "web"):
        request = rpb.GetModelRequest(name="absent")
        _wait(_routed(mesh, via, "/modelgrid.registry.v1.ModelRegistry/GetModel", request, found), f"{via} registry")
    if mesh.trainer is not None:
        ok = {grpc.StatusCode.OK}
        for via in ("direct", "gateway"):
            method = "/modelgrid.trainer.v1.Trainer/ListJobs"
            _wait(_routed(mesh, via, method, tpb.ListJobsRequest(), ok), f"{via} trainer")
    if mesh.predictor is not None:
        x = np.ones((1, 4), np.float32)
        request = ppb.PredictRequest(model=common_pb2.ModelRef(name=mesh.model), inputs={"x": array_to_tensor(x)})
        for via in ("direct", "gateway"):
            method = "/modelgrid.predictor.v1.Predictor/Predict"
            _wait(_routed(mesh, via, method, request, {grpc.StatusCode.OK}), f"{via} predictor serves the model", 120)


# -- small helpers as fixtures (nothing under tests/ is imported as a module) --------------------------------


@pytest.fixture(scope="session")
def digits_copy() -> Callable[[Path], Path]:
    """`digits_copy(directory) -> path`: the shipped digits NPZ copied into `directory`."""

    def copy(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(DIGITS_NPZ, directory / "digits.npz"))

    return copy
