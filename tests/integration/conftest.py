"""Fixtures of the integration tier (services as real subprocesses): a registry on the session Consul and Redis,
a real OTLP trace receiver, the predictor's request builder, a wait for a gateway's first route, and a certificate
for a gateway's public port."""

import datetime
import ipaddress
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from modelgrid.client.modelref import ModelRef
from modelgrid.client.tensors import array_to_tensor
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2
from services.kit import tls
from services.kit.processes import ServiceProcess


@pytest.fixture(scope="module")
def registry(request, consul, redis_server, launch, tmp_path_factory) -> Iterator[ServiceProcess]:
    """A registry subprocess for the module on the session Consul and Redis, with its own blob dir and Redis key
    prefix. A module passes extra settings in a module-level `REGISTRY_SETTINGS = {"MAX_PAGE_SIZE": "2"}`; a test
    that needs a registry of its own (own Consul or Redis, a restart) starts one with `launch.registry(...)`."""
    settings = getattr(request.module, "REGISTRY_SETTINGS", {})
    process = launch.registry(consul.http_url, redis_server.url, tmp_path_factory.mktemp("registry"), **settings)
    yield process
    process.stop()


# -- traces ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    ids = (span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex())
                    self.spans.append(ReceivedSpan(service, span.name, span.kind, *ids))
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> "OtlpCollector":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0)


@pytest.fixture(scope="module")
def otlp_collector() -> Iterator[OtlpCollector]:
    """A real OTLP/gRPC trace receiver on a free port (`.port`): services export their spans to it over the wire
    and the test reads `.spans`."""
    with OtlpCollector() as collector:
        yield collector


# -- predictor requests ----------------------------------------------------------------------------------------


def _predict_request(ref: str, x: np.ndarray, **inputs: np.ndarray) -> predictor_pb2.PredictRequest:
    parsed = ModelRef.parse(ref)
    model = common_pb2.ModelRef(name=parsed.name)
    if parsed.version:
        model.version = parsed.version
    elif parsed.alias:
        model.alias = parsed.alias
    tensors = {"x": array_to_tensor(x), **{k: array_to_tensor(v) for k, v in inputs.items()}}
    return predictor_pb2.PredictRequest(model=model, inputs=tensors)


@pytest.fixture(scope="session")
def predict_request() -> Callable[..., predictor_pb2.PredictRequest]:
    """`predict_request("name@alias" | "name:3" | "name", x, **more_inputs)`: a PredictRequest with input "x"."""
    return _predict_request


def _until_routed(call: Callable[[], object], what: str, timeout: float = 60.0) -> grpc.StatusCode:
    """Makes `call()` (a call through a gateway) until it is answered by something other than UNAVAILABLE, which a
    gateway answers until Consul has seen the backend's health check pass; returns the status of that answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                return err.code()
        assert time.monotonic() < deadline, f"the gateway never routed to {what}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def until_routed() -> Callable[..., grpc.StatusCode]:
    """`until_routed(call, what, timeout=60)`: waits until a gateway routes `call` to its backend (module fixtures
    that start a gateway beside its backends wait so before their first test)."""
    return _until_routed


def _gateway_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, cert, key): a private CA made as the mesh's is (services.kit.tls), and a certificate it signs for
    the gateway's public ports at 127.0.0.1 (an IP address name, which the mesh's certificates do not carry)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls.init(directory, ())  # the CA alone
    ca_key = serialization.load_pem_private_key(tls.key_path(directory, "ca").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(tls.cert_path(directory, "ca").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.test")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "gateway.pem", directory / "gateway-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return tls.cert_path(directory, "ca"), cert_file, key_file


@pytest.fixture(scope="session")
def gateway_certificate() -> Callable[[Path], tuple[Path, Path, Path]]:
    """`ca, cert, key = gateway_certificate(directory)`: a private CA and a certificate it signs for a gateway's
    public ports at 127.0.0.1."""
    return _gateway_certificate


# -- an S3-compatible store ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator:
    """moto's S3 server (kit.s3local.S3Server) on a free loopback port for the module; meanwhile its test credentials
    are in this process's standard AWS variables (and nothing of this machine's ~/.aws is read), so that the services
    the module launches inherit them. `.endpoint_url`, `.create_bucket(name)`, `.client()`."""
    from services.kit.s3local import S3Server

    directory = tmp_path_factory.mktemp("s3")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3Server.credentials_env().items():
            patch.setenv(name, value)
        patch.setenv("AWS_CONFIG_FILE", str(directory / "no-aws-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(directory / "no-aws-credentials"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.delenv("AWS_PROFILE", raising=False)
        with S3Server(directory) as server:
            yield server
