"""Host descriptions (modelgrid-host): the shipped examples parse, mistakes are named, and each service gets its
host's address, its local Consul agent and a state path of its own host."""

import http.server
import json
import re
import stat
import threading
from pathlib import Path

import pytest

from services.host.description import DescriptionError, HostDescription
from services.host.runner import HostError, HostRunner
from services.kit import tls
from services.kit.consul_acl import write_token_file
from services.kit.processes import REPO_ROOT
from services.kit.redis_auth import read_password_file, write_password_file

EXAMPLES = sorted((REPO_ROOT / "deploy" / "hosts").glob("*.toml"))
TOKEN = "6a1f0e0c-3c1e-4d7e-9f6b-0d2a5c8e4b11"
"""A Consul master token, as the operator makes one."""


def host(**overrides) -> dict:
    raw = {
        "name": "b",
        "address": "198.18.0.2",
        "redis_url": "redis://198.18.0.1:6379/0",
        "consul": {"server": True, "retry_join": ["198.18.0.1"]},
        "services": {"predictor": {"settings": {"auto_load": "true"}}, "registry": {"port": 50052}},
    }
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_examples_parse(path: Path):
    description = HostDescription.load(path)
    assert description.consul.server and len(description.consul.retry_join) == 2


def test_the_shipped_examples_share_one_redis_password_file():
    assert len({HostDescription.load(path).redis_password_file for path in EXAMPLES}) == 1


def test_services_start_in_dependency_order_with_their_defaults():
    description = HostDescription.parse(host())
    assert [(s.kind, s.port) for s in description.services] == [("registry", 50052), ("predictor", 50061)]
    assert description.services[1].settings == {"AUTO_LOAD": "true"}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"address": "not-an-address"}, "address"),
        ({"name": "b c"}, "name"),
        ({"colour": "blue"}, "colour"),
        ({"services": {"database": {}}}, "database"),
        ({"consul": {"server": True}}, "retry_join"),
        ({"redis_url": ""}, "redis_url"),
        ({"redis_password_file": "redis-password"}, "redis_password_file"),
        ({"tls_dir": "certs"}, "tls_dir"),
    ],
)
def test_mistakes_are_named(overrides, named):
    with pytest.raises(DescriptionError, match=named):
        HostDescription.parse(host(**overrides))


def test_a_service_binds_and_advertises_the_host_address_and_uses_the_local_agent(tmp_path):
    description = HostDescription.parse(host(state_dir=str(tmp_path)))
    env = HostRunner(description)._service_env(description.services[1])
    assert env["MODELGRID_PREDICTOR_HOST"] == env["MODELGRID_PREDICTOR_ADVERTISE_HOST"] == "198.18.0.2"
    assert env["MODELGRID_PREDICTOR_CONSUL_URL"] == "http://127.0.0.1:8500"
    assert env["MODELGRID_PREDICTOR_CACHE_DIR"].startswith(str(tmp_path))
    assert env["MODELGRID_PREDICTOR_AUTO_LOAD"] == "true"


def test_services_but_the_agent_read_the_redis_password_from_the_host_file(tmp_path):
    description = HostDescription.parse(
        host(redis_password_file="/etc/modelgrid/redis-password", services={"registry": {}, "agent": {}})
    )
    registry, agent = (HostRunner(description)._service_env(service) for service in description.services)
    assert registry["MODELGRID_REGISTRY_REDIS_PASSWORD_FILE"] == "/etc/modelgrid/redis-password"
    assert "MODELGRID_AGENT_REDIS_PASSWORD_FILE" not in agent  # an agent keeps nothing in Redis
    assert HostDescription.parse(host(state_dir=str(tmp_path))).redis_password_file == tmp_path / "redis-password"


def test_the_redis_host_makes_the_password_file_once_and_the_others_need_a_copy(tmp_path):
    shared = tmp_path / "etc" / "redis-password"
    redis_host = HostDescription.parse(
        host(address="198.18.0.1", redis_url="", redis={"port": 6379}, redis_password_file=str(shared))
    )
    password = HostRunner(redis_host).redis_password()
    assert password and stat.S_IMODE(shared.stat().st_mode) == 0o600
    assert HostRunner(redis_host).redis_password() == password == read_password_file(shared)  # kept, not remade

    copy = tmp_path / "b" / "redis-password"
    other_host = HostDescription.parse(host(redis_password_file=str(copy)))
    with pytest.raises(HostError, match=f"{copy}.*copy it"):
        HostRunner(other_host).redis_password()
    write_password_file(copy, password)
    assert HostRunner(other_host).redis_password() == password
    agents_only = HostDescription.parse(host(redis_password_file=str(copy) + "-absent", services={"agent": {}}))
    assert HostRunner(agents_only).redis_password() is None


def test_services_and_the_consul_agent_use_the_hosts_copy_of_the_mesh_certificates(tmp_path):
    description = HostDescription.parse(host(state_dir=str(tmp_path)))
    runner = HostRunner(description)
    assert description.tls_dir == tmp_path / "tls"
    env = runner._service_env(description.services[0])
    assert env["MODELGRID_REGISTRY_INTERNAL_TLS_DIR"] == str(tmp_path / "tls")
    agent_config = " ".join(runner._consul_command())
    assert f'cert_file = "{tmp_path / "tls" / "consul.pem"}"' in agent_config
    assert "enable_agent_tls_for_checks = true" in agent_config
    with pytest.raises(HostError, match="services.kit.tls init"):  # no certificates: `up` stops before starting
        runner.internal_tls()
    tls.init(tmp_path / "tls", ["consul", "operator"], ca_dir=tmp_path / "ca")
    assert runner.internal_tls().identity == "operator"


def test_the_consul_master_token_file_defaults_to_the_state_dir_and_the_examples_share_one(tmp_path):
    assert HostDescription.parse(host(state_dir=str(tmp_path))).consul_master_token_file == (
        tmp_path / "consul-master-token"
    )
    given = HostDescription.parse(host(consul_master_token_file="/etc/modelgrid/consul-master-token"))
    assert given.consul_master_token_file == Path("/etc/modelgrid/consul-master-token")
    assert len({HostDescription.load(path).consul_master_token_file for path in EXAMPLES}) == 1


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"consul_master_token_file": "consul-master-token"}, "consul_master_token_file"),
        ({"consul_master_token_file": 7}, "consul_master_token_file"),
        ({"services": {"predictor": {"settings": {"service_name": 'predictor" { policy = "write" } #'}}}}, "predictor"),
    ],
)
def test_consul_mistakes_are_named(overrides, named):
    with pytest.raises(DescriptionError, match=named):
        HostDescription.parse(host(**overrides))


def test_a_host_without_the_consul_master_token_stops_and_says_how_to_make_it(tmp_path):
    runner = HostRunner(HostDescription.parse(host(state_dir=str(tmp_path))))
    with pytest.raises(HostError, match=re.escape(str(tmp_path / "consul-master-token")) + ".*uuid.*every host"):
        runner.consul_master_token()
    with pytest.raises(HostError, match="consul-master-token"):  # status asks Consul with it: says so first
        runner.status()
    write_token_file(tmp_path / "consul-master-token", TOKEN)
    assert runner.consul_master_token() == TOKEN


def acl_config(runner: HostRunner) -> dict:
    runner._write_consul_config()
    assert stat.S_IMODE(runner.consul_config_file.stat().st_mode) == 0o600
    return json.loads(runner.consul_config_file.read_text())["acl"]


@pytest.mark.parametrize("server", [True, False], ids=["server", "client"])
def test_the_consul_agent_reads_its_acls_and_tokens_from_a_private_file_not_its_command_line(tmp_path, server):
    description = HostDescription.parse(host(state_dir=str(tmp_path), consul={"server": server, "retry_join": ["a"]}))
    write_token_file(description.consul_master_token_file, TOKEN)
    runner = HostRunner(description)
    acl = acl_config(runner)
    assert acl["enabled"] is True and acl["default_policy"] == "deny" and acl["down_policy"] == "extend-cache"
    assert acl["enable_token_persistence"] is True
    # Servers hold the master token; every agent starts with it as its own token, until `up` gives it one.
    assert acl["tokens"] == ({"master": TOKEN, "agent": TOKEN} if server else {"agent": TOKEN})
    command = runner._consul_command()
    assert f"-config-file={runner.consul_config_file}" in command
    assert runner.consul_config_file.is_relative_to(tmp_path)
    assert TOKEN not in " ".join(command)  # `ps` shows a command line


def test_each_service_gets_a_consul_token_file_of_its_own_on_its_host(tmp_path):
    description = HostDescription.parse(
        host(state_dir=str(tmp_path), services={"agent": {}, "predictor": {"settings": {"service_name": "scorer"}}})
    )
    runner = HostRunner(description)
    predictor, agent = (runner._service_env(service) for service in description.services)
    assert agent["MODELGRID_AGENT_CONSUL_TOKEN_FILE"] == str(tmp_path / "consul-tokens" / "trainer-agent")
    assert predictor["MODELGRID_PREDICTOR_CONSUL_TOKEN_FILE"] == str(tmp_path / "consul-tokens" / "scorer")
    assert not any(TOKEN in value for value in [*agent.values(), *predictor.values()])


def test_the_runners_consul_queries_send_the_master_token(tmp_path):
    """Under default deny an anonymous health query sees no instance: `_passing` asks with the master token."""
    seen: list[str | None] = []

    class FakeAgent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("X-Consul-Token"))
            entries = [{"Service": {"Address": "198.18.0.2", "Port": 50061}}] if seen[-1] == TOKEN else []
            body = json.dumps(entries).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAgent) as fake:
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        try:
            consul = {"server": True, "retry_join": ["a"], "http_port": fake.server_address[1]}
            description = HostDescription.parse(
                host(state_dir=str(tmp_path), consul=consul, services={"predictor": {}})
            )
            write_token_file(description.consul_master_token_file, TOKEN)
            assert HostRunner(description)._passing(description.services[0])
        finally:
            fake.shutdown()
    assert seen == [TOKEN]
