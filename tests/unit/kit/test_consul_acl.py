"""Consul with ACLs on (default deny) and a token per service, against a real dev agent of this module's own: what
an anonymous caller, a service's token and an unknown token may do, where the tokens are kept, and the agent's TLS
configuration for its health checks."""

import asyncio
import json
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.kit.consul import ConsulAclError, ConsulClient, Registration
from services.kit.consul_acl import ConsulTokenError
from services.kit.hostaddr import host_address
from services.kit.localinfra import ConsulAgent, InfraError, service_token
from services.kit.processes import ServiceProcess
from services.kit.server import GrpcService, ServiceSpec
from services.kit.settings import ServiceSettings

session_loop = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Iterator[ConsulAgent]:
    with ConsulAgent(tmp_path_factory.mktemp("consul-acl")) as running:
        yield running


@pytest.fixture
def no_env_token(monkeypatch) -> None:
    """No $CONSUL_HTTP_TOKEN to fall back on: a client sends only the token it was given."""
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)


@pytest_asyncio.fixture(loop_scope="session")
async def clients(agent: ConsulAgent, no_env_token) -> AsyncIterator:
    """`client(token)`: a ConsulClient of the module's agent with that token ("" : anonymous), closed after the test."""
    made: list[ConsulClient] = []

    def client(token: str) -> ConsulClient:
        made.append(ConsulClient(agent.http_url, token=token, timeout=5.0))
        return made[-1]

    yield client
    for each in made:
        await each.close()


def _registration(name: str, unique) -> Registration:
    return Registration(id=unique(name), name=name, address="127.0.0.1", port=1)


@session_loop
async def test_an_anonymous_caller_can_neither_register_nor_see_anything(agent, clients, unique) -> None:
    admin, anonymous = clients(agent.master_token), clients("")
    real = _registration("predictor", unique)
    await admin.register(real, passing=True)

    with pytest.raises(ConsulAclError) as refused:
        await anonymous.register(_registration("predictor", unique))
    assert refused.value.response.status_code == 403
    assert "no Consul ACL token was given" in str(refused.value) and "consul_token" in str(refused.value)
    with pytest.raises(ConsulAclError):
        await anonymous.registered(real.id)
    _, seen = await anonymous.service_health("predictor")  # Consul filters what a token may not read: nothing
    assert seen == []
    _, seen = await admin.service_health("predictor")
    assert real.id in {instance.id for instance, _ in seen}
    await admin.deregister(real.id)


@session_loop
async def test_a_service_token_registers_its_own_name_only(agent, clients, unique) -> None:
    token = agent.token_for("registry")
    registry, admin = clients(token), clients(agent.master_token)
    own = _registration("registry", unique)
    await registry.register(own, passing=True)
    assert (await registry.registered(own.id))["Service"] == "registry"  # GET /v1/agent/service/:id: service read

    # A fake predictor the gateway would route to: refused, and the message names the right and the setting.
    with pytest.raises(ConsulAclError) as refused:
        await registry.register(_registration("predictor", unique))
    message = str(refused.value)
    assert "service:write on predictor" in message and "consul_token" in message and token not in message

    # Nor may it take another service's instance out of the catalog.
    other = _registration("predictor", unique)
    await admin.register(other, passing=True)
    with pytest.raises(ConsulAclError):
        await registry.deregister(other.id)

    # It reads the health of every service (discovery), its own and the others'.
    _, predictors = await registry.healthy_instances("predictor")
    assert other.id in {instance.id for instance in predictors}
    await registry.deregister(own.id)
    assert await registry.registered(own.id) is None
    await admin.deregister(other.id)


@session_loop
async def test_an_unknown_token_is_refused_with_the_setting_to_fix_and_never_echoed(agent, clients, unique) -> None:
    wrong = str(uuid.uuid4())
    with pytest.raises(ConsulAclError) as refused:
        await clients(wrong).register(_registration("registry", unique))
    message = str(refused.value)
    assert "ACL not found" in message and "consul_token" in message and wrong not in message


@session_loop
async def test_a_service_with_its_token_registers_keeps_its_registration_and_learns_its_address(
    agent, no_env_token, unique
) -> None:
    token = agent.token_for("trainer")
    assert await host_address(agent.http_url, consul_token=token) == "127.0.0.1"  # GET /v1/agent/self: agent read
    settings = ServiceSettings(
        port=0, consul_url=agent.http_url, consul_token=token, consul_resync_interval=0.2, shutdown_grace_seconds=0.1
    )
    service = GrpcService(ServiceSpec("trainer", "0", [], lambda server: None), settings, TracerProvider())
    admin = ConsulClient(agent.http_url, token=agent.master_token)
    try:
        await service.start()
        await service.set_serving(True)
        assert (await admin.registered(service.instance_id))["Service"] == "trainer"
        await admin.deregister(service.instance_id)  # as an agent that lost it: the service registers again
        for _ in range(50):
            if await admin.registered(service.instance_id) is not None:
                break
            await asyncio.sleep(0.1)
        assert await admin.registered(service.instance_id) is not None
        await service.stop()  # deregisters with its own token
        assert await admin.registered(service.instance_id) is None
    finally:
        await service.stop()
        await admin.close()


def test_tokens_are_stable_and_kept_in_files_of_mode_0600(agent) -> None:
    token = agent.token_for("gateway")
    assert agent.token_for("gateway") == token and agent.token_for("predictor") != token
    files = [agent.token_file("gateway"), agent.master_token_file, agent.config_file]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert agent.token_file("gateway").read_text().strip() == token
    assert agent.master_token_file.read_text().strip() == agent.master_token
    config = json.loads(agent.config_file.read_text())["acl"]
    assert config["enabled"] is True and config["default_policy"] == "deny" and config["enable_token_persistence"]
    with pytest.raises(ValueError):
        agent.token_for('x" { policy = "write" } service_prefix "')  # a name goes into HCL rules: never injectable


def test_a_launcher_that_knows_only_the_url_gets_the_agents_own_token(agent, monkeypatch) -> None:
    assert service_token(agent.http_url + "/", "gateway") == agent.token_for("gateway")  # kept: made again on restart
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    with pytest.raises(InfraError, match="CONSUL_HTTP_TOKEN"):
        service_token("http://127.0.0.1:1", "gateway")


def test_the_master_token_is_consul_http_token_when_set(tmp_path, monkeypatch) -> None:
    chosen = str(uuid.uuid4())
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", chosen)
    assert ConsulAgent(tmp_path / "a").master_token == chosen
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    first = ConsulAgent(tmp_path / "b").master_token
    assert first not in ("", chosen)


@session_loop
async def test_service_tokens_work_again_after_the_agent_restarts(tmp_path, no_env_token, unique) -> None:
    with ConsulAgent(tmp_path / "consul") as restarting:
        token = restarting.token_for("registry")
        restarting.kill()  # a dev agent forgets its ACLs
        restarting.start()
        assert restarting.token_for("registry") == token
        client = ConsulClient(restarting.http_url, token=token)
        try:
            await client.register(_registration("registry", unique))
        finally:
            await client.close()


def test_settings_take_the_token_from_its_file_and_keep_it_out_of_their_repr(tmp_path) -> None:
    token_file = tmp_path / "consul-token"
    token_file.write_text("  a-token-from-a-file\n")
    settings = ServiceSettings(consul_token="ignored", consul_token_file=token_file)
    assert settings.consul_token == "a-token-from-a-file"
    assert "a-token-from-a-file" not in repr(settings)
    with pytest.raises(ConsulTokenError, match="missing"):
        ServiceSettings(consul_token_file=tmp_path / "missing")


def test_a_service_given_its_token_does_not_inherit_consul_http_token(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "the-callers-token")
    own = ServiceProcess("services.registry", "MODELGRID_REGISTRY_", {"CONSUL_TOKEN": "own"}, tmp_path / "log")
    assert "CONSUL_HTTP_TOKEN" not in own.env and own.env["MODELGRID_REGISTRY_CONSUL_TOKEN"] == "own"
    plain = ServiceProcess("services.registry", "MODELGRID_REGISTRY_", {}, tmp_path / "log")
    assert plain.env["CONSUL_HTTP_TOKEN"] == "the-callers-token"


def _certificates(directory: Path) -> Path:
    """A throwaway CA, a certificate for the agent (consul.pem, consul-key.pem) and one for a server (server.pem,
    server-key.pem), both signed by it (ca.pem)."""
    directory.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    days = ["-days", "1"]
    ca = ["-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial"]
    commands = [["req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", *days, "-subj", "/CN=test CA"]]
    for name in ("consul", "server"):
        commands += [
            ["req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}"],
            ["x509", "-req", "-in", f"{name}.csr", *ca, "-out", f"{name}.pem", *days],
        ]
    for command in commands:
        subprocess.run(["openssl", *command], cwd=directory, check=True, capture_output=True)
    return directory


def _mtls_health_server(tls_dir: Path) -> tuple[grpc.Server, int]:
    """A gRPC health endpoint (SERVING) that requires a client certificate signed by the CA in tls_dir."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    pair = ((tls_dir / "server-key.pem").read_bytes(), (tls_dir / "server.pem").read_bytes())
    credentials = grpc.ssl_server_credentials(
        [pair], root_certificates=(tls_dir / "ca.pem").read_bytes(), require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@session_loop
async def test_with_a_tls_dir_the_agent_checks_present_its_certificate(tmp_path, unique) -> None:
    tls_dir = _certificates(tmp_path / "tls")
    server, port = _mtls_health_server(tls_dir)
    try:
        with ConsulAgent(tmp_path / "consul", tls_dir=tls_dir) as agent:
            config = json.loads(agent.config_file.read_text())
            client = ConsulClient(agent.http_url, token=agent.token_for("registry"))
            registration = Registration(
                id=unique("registry"), name="registry", address="127.0.0.1", port=port, tls=True, check_interval="1s"
            )
            try:
                await client.register(registration)  # starts critical: passing only once the agent's check got in
                for _ in range(100):
                    _, healthy = await client.healthy_instances("registry")
                    if registration.id in {instance.id for instance in healthy}:
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("the agent's gRPC check never passed against a server that requires mTLS")
            finally:
                await client.close()
    finally:
        server.stop(None)
    assert config["enable_agent_tls_for_checks"] is True
    assert config["ca_file"] == str(tls_dir / "ca.pem")
    assert config["cert_file"] == str(tls_dir / "consul.pem")
    assert config["key_file"] == str(tls_dir / "consul-key.pem")
    assert "verify_incoming" not in config and "ports" not in config  # the HTTP API stays plain HTTP on loopback

    (tls_dir / "consul.pem").unlink()
    with pytest.raises(InfraError, match="consul.pem"):
        ConsulAgent(tmp_path / "consul-2", tls_dir=tls_dir).start()
