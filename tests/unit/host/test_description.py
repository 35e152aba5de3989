"""Host descriptions (modelgrid-host): the shipped examples parse, mistakes are named, and each service gets its
host's address, its local Consul agent and a state path of its own host."""

from pathlib import Path

import pytest

from services.host.description import DescriptionError, HostDescription
from services.host.runner import HostRunner
from services.kit.processes import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "deploy" / "hosts").glob("*.toml"))


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
