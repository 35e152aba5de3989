"""Internal mTLS (kit.tls): the local CA and its certificates, and a real GrpcService that admits only callers with
a certificate the CA signed, proves which service it is, and (for the agents) lets only named identities call."""

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.kit import tls
from services.kit.server import GrpcService, ServiceSpec
from services.kit.settings import ServiceSettings

on_module_loop = pytest.mark.asyncio(loop_scope="module")  # the loop of the module-scoped service

ECHO = "/modelgrid.test.v1.Echo/Echo"


def _add_echo(server: grpc.aio.Server) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "modelgrid.test.v1.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return tls.init(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """A second CA with the same identities: trusted by nobody in the mesh."""
    return tls.init(tmp_path_factory.mktemp("other-tls"))


async def _serve(certs: Path, callers: frozenset[str] = frozenset()) -> GrpcService:
    settings = ServiceSettings(
        host="127.0.0.1", port=0, consul_enabled=False, internal_tls_dir=certs, shutdown_grace_seconds=0.1
    )
    spec = ServiceSpec("trainer-agent", "0", [], _add_echo, callers=callers)
    service = GrpcService(spec, settings, TracerProvider())
    await service.start()
    await service.set_serving(True)
    return service


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def agent(certs) -> AsyncIterator[GrpcService]:
    """An internal service that, like the worker agents, accepts only the trainer."""
    service = await _serve(certs, callers=frozenset({"trainer"}))
    yield service
    await service.stop()


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def test_init_makes_a_ca_and_one_certificate_per_identity_readable_only_by_its_owner(certs):
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for name in ("ca", *tls.IDENTITIES):
        assert tls.cert_path(certs, name).is_file()
        assert stat.S_IMODE(tls.key_path(certs, name).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(tls.cert_path(certs, "ca").read_bytes())
    registry = x509.load_pem_x509_certificate(tls.cert_path(certs, "registry").read_bytes())
    assert registry.issuer == ca.subject
    names = registry.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["registry", tls.MESH_NAME]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_is_idempotent_and_renew_issues_a_new_certificate_from_the_same_ca(tmp_path):
    directory = tls.init(tmp_path / "tls", ["registry"])
    ca, cert = (tls.cert_path(directory, n).read_bytes() for n in ("ca", "registry"))
    tls.init(directory, ["registry"])
    assert tls.cert_path(directory, "ca").read_bytes() == ca
    assert tls.cert_path(directory, "registry").read_bytes() == cert
    tls.renew(directory, ["registry"])
    renewed = tls.cert_path(directory, "registry").read_bytes()
    assert renewed != cert
    assert tls.cert_path(directory, "ca").read_bytes() == ca
    with pytest.raises(ValueError, match="identity"):
        tls.init(directory, ["../etc"])


def test_a_separate_ca_dir_keeps_the_ca_key_away_from_the_certificates(tmp_path):
    certs = tls.init(tmp_path / "certs", ["registry"], ca_dir=tmp_path / "ca")
    assert tls.key_path(tmp_path / "ca", "ca").is_file() and not tls.key_path(certs, "ca").exists()
    assert tls.cert_path(certs, "ca").read_bytes() == tls.cert_path(tmp_path / "ca", "ca").read_bytes()
    tls.InternalTLS(certs, "registry")  # complete for the service


def test_a_missing_certificate_is_named_with_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="services.kit.tls init"):
        tls.InternalTLS(tmp_path, "registry")


def test_the_cli_makes_what_is_missing(tmp_path):
    assert tls.main(["init", str(tmp_path / "d"), "registry", "operator"]) == 0
    assert tls.cert_path(tmp_path / "d", "operator").is_file()
    assert tls.main(["renew", str(tmp_path / "nothing-here"), "registry"]) == 1


@on_module_loop
async def test_a_caller_with_a_certificate_from_the_ca_is_served(agent, certs):
    trainer = tls.InternalTLS(certs, "trainer")
    async with tls.dial(f"127.0.0.1:{agent.port}", "trainer-agent", trainer, aio=True) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await channel.unary_unary(ECHO)(b"ping", timeout=5) == b"ping"


@on_module_loop
async def test_plaintext_and_certificateless_and_foreign_callers_are_refused(agent, certs, other_ca):
    target = f"127.0.0.1:{agent.port}"
    attempts = {
        "plaintext": grpc.aio.insecure_channel(target),
        "no client certificate": grpc.aio.secure_channel(
            target,
            grpc.ssl_channel_credentials(tls.cert_path(certs, "ca").read_bytes()),
            options=tls.expect("trainer-agent"),
        ),
        "another CA's certificate": tls.dial(target, "trainer-agent", tls.InternalTLS(other_ca, "trainer"), aio=True),
    }
    for what, channel in attempts.items():
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await _health(channel)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, what


@on_module_loop
async def test_a_server_must_prove_it_is_the_service_the_channel_expects(agent, certs):
    """An agent's certificate does not pass for the registry: a caller of the registry sent to it fails."""
    async with tls.dial(f"127.0.0.1:{agent.port}", "registry", tls.InternalTLS(certs, "trainer"), aio=True) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _health(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@on_module_loop
async def test_only_the_listed_callers_reach_the_methods_but_every_peer_reaches_health(agent, certs):
    async with tls.dial(
        f"127.0.0.1:{agent.port}", "trainer-agent", tls.InternalTLS(certs, "operator"), aio=True
    ) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(ECHO)(b"start a process", timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "operator may not call this service; it accepts trainer" in refused.value.details()


@on_module_loop
async def test_a_service_without_certificates_refuses_to_serve_plaintext_off_loopback(certs):
    settings = ServiceSettings(host="0.0.0.0", port=0, consul_enabled=False)
    service = GrpcService(ServiceSpec("registry", "0", [], lambda server: None), settings, TracerProvider())
    with pytest.raises(RuntimeError, match="internal_tls_dir"):
        await service.start()
    await service.stop()


async def test_the_health_port_answers_plaintext_health_and_nothing_else(certs):
    """For Kubernetes' grpc probes, which present no client certificate: the mTLS port refuses them, the health
    port (HEALTH_PORT) answers grpc.health.v1 in plaintext, with the service's statuses, and serves no API."""
    settings = ServiceSettings(
        host="127.0.0.1",
        port=0,
        health_port=0,
        consul_enabled=False,
        internal_tls_dir=certs,
        shutdown_grace_seconds=0.1,
    )
    spec = ServiceSpec("trainer-agent", "0", ["modelgrid.test.v1.Echo"], _add_echo)
    service = GrpcService(spec, settings, TracerProvider())
    await service.start()
    try:
        assert service.health_port > 0 and service.health_port != service.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            ask = health_pb2.HealthCheckRequest(service="modelgrid.test.v1.Echo")
            assert (await stub.Check(ask, timeout=5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await service.set_serving(True)
            assert (await stub.Check(ask, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(ECHO)(b"hi", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):  # the service's own port: mTLS only
                await _health(plain)
    finally:
        await service.stop()
