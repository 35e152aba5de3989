"""deploy/Dockerfile's role images: a target per role, non-root, with a gRPC HEALTHCHECK; the gateway and registry
images hold no TensorFlow (their modules never import it, and their requirements never pull it in); and the health
check they and the Kubernetes probes run answers as it should against real gRPC servers, plaintext and mTLS.

No Docker engine runs here: the images are not built; what the build would do is checked from its inputs.
"""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement

from services.kit import tls

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
HEALTH_CHECK_SCRIPT = REPO_ROOT / "deploy" / "k8s" / "grpc-health-check.py"
SLIM_ROLES = {"gateway": "services.gateway.main", "registry": "services.registry.main"}
ROLE_MODULES = {
    "gateway": "services.gateway",
    "registry": "services.registry",
    "predictor": "services.predictor",
    "trainer": "services.trainer",
    "agent": "services.trainer.agent",
}
TENSORFLOW = {"tensorflow", "tf-keras", "tensorflow-cpu", "tensorflow-intel", "keras"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _stages() -> dict[str, tuple[str, list[str]]]:
    """The Dockerfile's stages in order: name -> (the stage or image it starts FROM, its instructions)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "FROM":
            current = []
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else f"stage{len(stages)}"
            stages[name] = (words[1], current)
        elif current is not None:
            current.append(line)
    return stages


def _lineage(stages: dict[str, tuple[str, list[str]]], name: str) -> list[str]:
    """The instructions of a stage and of the stages it is built FROM, oldest first."""
    parent, instructions = stages[name]
    return (_lineage(stages, parent) if parent in stages else []) + instructions


def _slim_exclude() -> set[str]:
    found = re.search(r"^ARG SLIM_EXCLUDE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert found, f"{DOCKERFILE}: no ARG SLIM_EXCLUDE=..."
    return {_normalise(name) for name in found[1].split(",")}


# -- the images ---------------------------------------------------------------------------------------------------


def test_each_role_has_a_target_that_runs_it_as_uid_10001_with_a_grpc_healthcheck() -> None:
    stages = _stages()
    for role, module in ROLE_MODULES.items():
        assert role in stages, f"{DOCKERFILE}: no stage `{role}` (docker build --target {role})"
        lineage = _lineage(stages, role)
        users = [line.split()[1] for line in lineage if line.startswith("USER ")]
        assert users and users[-1] == "10001:10001", f"{role}: runs as {users[-1:] or 'root'}"
        checks = [line for line in lineage if line.startswith("HEALTHCHECK ")]
        assert checks, f"{role}: no HEALTHCHECK"
        assert f'CMD ["python", "/usr/local/bin/modelgrid-health-check", "{role}"]' in checks[-1], checks[-1]
        commands = [line for line in lineage if line.startswith("CMD ")]
        assert commands[-1] == f'CMD ["python", "-m", "{module}"]', f"{role}: {commands[-1]}"
        assert any(
            line == "COPY deploy/k8s/grpc-health-check.py /usr/local/bin/modelgrid-health-check" for line in lineage
        ), f"{role}: the health check is not in the image"


def test_the_gateway_and_registry_images_take_the_slim_venv_and_the_others_the_whole_one() -> None:
    stages = _stages()
    for role in ROLE_MODULES:
        venvs = [line for line in _lineage(stages, role) if line.startswith("COPY --from=") and "/opt/venv" in line]
        expected = "build-slim" if role in SLIM_ROLES else "build"
        assert venvs == [f"COPY --from={expected} /opt/venv /opt/venv"], f"{role}: {venvs}"


def test_the_default_target_is_still_the_full_image_compose_runs() -> None:
    """docker-compose.yml builds deploy/Dockerfile without a target: the last stage, which must run every service
    through deploy/consul-agent.sh."""
    stages = _stages()
    last = list(stages)[-1]
    assert last == "full", f"{DOCKERFILE}: the default (last) stage is {last}"
    lineage = _lineage(stages, last)
    assert "COPY --from=build /opt/venv /opt/venv" in lineage
    assert "COPY deploy/consul-agent.sh /usr/local/bin/consul-agent.sh" in lineage


def test_the_slim_requirements_exclude_tensorflow_and_nothing_they_require_pulls_it_in() -> None:
    """The gateway and registry images install pyproject's dependencies minus SLIM_EXCLUDE: walk what the installed
    distributions of those requirements require, transitively, and find no TensorFlow."""
    excluded = _slim_exclude()
    assert {"tensorflow", "tf-keras"} <= excluded
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = [Requirement(d) for d in dependencies]
    slim = [r for r in requirements if _normalise(r.name) not in excluded | {"modelgrid-client"}]
    assert len(slim) < len(requirements)
    seen: dict[str, str] = {}  # distribution -> who required it
    pending = [(r, "pyproject.toml") for r in slim]
    pending += [(Requirement(d), "modelgrid-client") for d in importlib.metadata.requires("modelgrid-client") or []]
    while pending:
        requirement, parent = pending.pop()
        name = _normalise(requirement.name)
        if name in seen:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        seen[name] = parent
        assert name not in TENSORFLOW, f"the slim venv would get {name}, required by {parent}"
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (an optional platform package): nothing more to walk
        for entry in requires:
            nested = Requirement(entry)
            if nested.marker is None or any(
                nested.marker.evaluate({"extra": extra}) for extra in (requirement.extras or {""})
            ):
                pending.append((Requirement(str(nested).split(";")[0]), name))
    assert "grpcio" in seen and "redis" in seen


@pytest.mark.parametrize("role", sorted(SLIM_ROLES))
def test_the_slim_roles_main_module_does_not_import_tensorflow(role: str) -> None:
    module = SLIM_ROLES[role]
    code = (
        f"import {module}, sys; "
        "assert 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m or 'keras' in m)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} imports TensorFlow:\n{result.stderr[-2000:]}"


# -- the health check ---------------------------------------------------------------------------------------------


class HealthServer:
    """A real gRPC server with the standard health service on 127.0.0.1 (plaintext or the mesh's mTLS)."""

    def __init__(self, credentials: grpc.ServerCredentials | None) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service, status)


def _check(role: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTH_CHECK_SCRIPT), role, *args],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mesh")
    tls.init(directory / "tls", ca_dir=directory / "ca")
    return directory / "tls"


@pytest.fixture
def plain_server() -> Iterator[HealthServer]:
    server = HealthServer(None)
    yield server
    server.server.stop(None)


def test_the_health_check_passes_only_on_serving_and_live_on_any_answer(plain_server: HealthServer) -> None:
    env = {"MODELGRID_GATEWAY_PORT": str(plain_server.port)}
    service = "modelgrid.gateway.v1.GatewayAdmin"
    plain_server.set("", False)
    plain_server.set(service, False)
    assert _check("gateway", env, service).returncode == 1
    assert _check("gateway", env, "--live").returncode == 0, "a NOT_SERVING server is alive"
    plain_server.set(service, True)
    assert _check("gateway", env, service).returncode == 0
    assert _check("gateway", env).returncode == 1, "the overall health is still NOT_SERVING"
    assert _check("gateway", env, "modelgrid.unknown.v1.Nothing").returncode == 1  # NOT_FOUND
    plain_server.server.stop(None)
    assert _check("gateway", env, "--live").returncode == 1, "nothing answers"
    assert _check("nosuchrole", env).returncode == 2


def test_the_health_check_speaks_the_mesh_mtls_with_the_roles_own_certificate(mesh: Path) -> None:
    server = HealthServer(tls.InternalTLS(mesh, "registry").server_credentials())
    try:
        server.set("", True)
        env = {"MODELGRID_REGISTRY_PORT": str(server.port)}
        assert _check("registry", {**env, "MODELGRID_REGISTRY_INTERNAL_TLS_DIR": str(mesh)}).returncode == 0
        assert _check("registry", env).returncode == 1, "a plaintext call to an mTLS port cannot pass"
        # The agent's identity is trainer-agent: its certificate is what the server must present.
        assert (
            _check(
                "agent", {"MODELGRID_AGENT_PORT": str(server.port), "MODELGRID_AGENT_INTERNAL_TLS_DIR": str(mesh)}
            ).returncode
            == 1
        )
    finally:
        server.server.stop(None)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for the DNS name `name`, as an operator might give the gateway."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_the_gateways_health_check_speaks_tls_with_its_public_certificate(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path, "modelgrid.test")
    server = HealthServer(grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())]))
    try:
        server.set("", True)
        env = {"MODELGRID_GATEWAY_PORT": str(server.port)}
        assert _check("gateway", {**env, "MODELGRID_GATEWAY_TLS_CERT": str(cert_file)}).returncode == 0
        assert _check("gateway", env).returncode == 1, "a plaintext call to a TLS port cannot pass"
    finally:
        server.server.stop(None)
