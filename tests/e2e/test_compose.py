"""deploy/docker-compose.yml is valid for docker-compose and starts only what the local mesh also runs and tests.

No Docker engine runs here, so the file is checked statically: `docker-compose config` must accept it, each
service built from deploy/Dockerfile must run a module that `make up` (scripts/mesh.py) runs too, and each
MODELGRID_<SERVICE>_* variable it sets must be a field of that service's settings class.
"""

import importlib
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest
import yaml

from services.kit.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
MESH_SCRIPT = REPO_ROOT / "scripts" / "mesh.py"
ENV_PREFIX = "MODELGRID_"
WITHOUT_REDIS = {"services.trainer.agent"}
"""Modules that keep no state in Redis: their containers need not wait for it (they do need Consul)."""
INTERNAL_ONLY = {"services.trainer.agent"}
"""Modules only other containers call (the trainer calls the agents): their port is exposed, not published."""


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as `docker-compose config` normalises it (anchors merged, paths absolute)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not found: install Debian's docker-compose package (`make setup` does)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE}:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert config["services"], "the compose file defines no services"
    return config


@pytest.fixture(scope="module")
def our_services(compose: dict) -> dict[str, dict]:
    """The compose services built from deploy/Dockerfile (not third-party images such as consul and redis)."""
    ours = {name: service for name, service in compose["services"].items() if _built_from_our_dockerfile(service)}
    assert ours, f"no service in {COMPOSE_FILE} is built from {DOCKERFILE}"
    return ours


def _built_from_our_dockerfile(service: dict) -> bool:
    build = service.get("build")
    if build is None:
        return False
    if isinstance(build, str):
        build = {"context": build}
    context = Path(build["context"])
    return (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def _module_of(service_name: str, service: dict) -> str:
    """The module a `python -m <module>` command runs."""
    command = service.get("command")
    assert command, f"{service_name}: no command (the one image runs whichever service the command names)"
    argv = shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
    assert argv[:2] == ["python", "-m"] and len(argv) >= 3, f"{service_name}: command {argv} is not python -m <module>"
    return argv[2]


def _settings_class(module: str) -> type[ServiceSettings]:
    """The one ServiceSettings subclass that `<module>.settings` defines."""
    settings_module = importlib.import_module(f"{module}.settings")
    classes = [
        value
        for value in vars(settings_module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value.__module__ == settings_module.__name__
    ]
    assert len(classes) == 1, f"{settings_module.__name__} should define one settings class, found {classes}"
    return classes[0]


def _environment(service: dict) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
    return {name: None if value is None else str(value) for name, value in environment.items()}


def _modelgrid_variables(service: dict) -> dict[str, str | None]:
    return {key: value for key, value in _environment(service).items() if key.startswith(ENV_PREFIX)}


def _replicas(service: dict) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def _ports(service: dict) -> list[tuple[str, str]]:
    """(published host port, container port) of each `ports` entry; the host port is "" when Docker picks one.
    docker-compose 1.29 normalises "50051:50051" to {published, target} but leaves "127.0.0.1::50061" a string."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((str(port.get("published") or ""), str(port["target"])))
            continue
        *host, target = str(port).split("/")[0].split(":")
        ports.append((host[-1] if host else "", target))
    return ports


def _exposed(service: dict) -> set[str]:
    """Container ports a service declares with `expose` (reachable on the compose network only)."""
    return {str(port).split("/")[0] for port in service.get("expose", [])}


def _settings_of(name: str, service: dict, monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The settings the service's module builds from the service's environment (and nothing from ours)."""
    settings_class = _settings_class(_module_of(name, service))
    prefix = settings_class.model_config["env_prefix"]
    with monkeypatch.context() as env:
        for variable in [key for key in os.environ if key.startswith(prefix)]:
            env.delenv(variable)
        for variable, value in _modelgrid_variables(service).items():
            if value is not None:
                env.setenv(variable, value)
        return settings_class()  # the values parse as the service itself will parse them


def _load_mesh_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("modelgrid_mesh_script", MESH_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_compose_config_is_valid(compose: dict) -> None:
    assert {"consul", "redis", "registry", "predictor", "agent", "trainer"} <= set(compose["services"])


def test_each_command_runs_a_repo_module_the_local_mesh_also_runs(our_services: dict, tmp_path: Path) -> None:
    local_modules = {service.module for service in _load_mesh_script().mesh(tmp_path)}
    for name, service in our_services.items():
        module = _module_of(name, service)
        path = REPO_ROOT.joinpath(*module.split("."))
        assert (path / "__main__.py").is_file() or path.with_suffix(".py").is_file(), f"{name}: no module {module}"
        assert module in local_modules, f"{name}: runs {module}, which scripts/mesh.py never runs ({local_modules})"


def test_compose_runs_every_module_the_local_mesh_runs(our_services: dict, tmp_path: Path) -> None:
    local_modules = {service.module for service in _load_mesh_script().mesh(tmp_path)}
    composed = {_module_of(name, service) for name, service in our_services.items()}
    assert local_modules <= composed, f"make up runs {sorted(local_modules - composed)}, which compose does not"


def test_each_modelgrid_variable_is_a_settings_field(our_services: dict) -> None:
    for name, service in our_services.items():
        settings_class = _settings_class(_module_of(name, service))
        prefix = settings_class.model_config["env_prefix"]
        for variable in _modelgrid_variables(service):
            where = f"{name}: {variable} ({settings_class.__name__}, prefix {prefix})"
            assert variable.startswith(prefix), f"{where}: wrong prefix, no setting reads it"
            assert variable.removeprefix(prefix).lower() in settings_class.model_fields, f"{where}: no such field"


def test_settings_make_each_service_reachable_on_the_compose_network(
    our_services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in our_services.items():
        module = _module_of(name, service)
        settings = _settings_of(name, service, monkeypatch)
        assert settings.host in ("0.0.0.0", "::"), f"{name}: binds {settings.host}, unreachable from other containers"
        if _replicas(service) == 1:
            assert settings.advertise_host == name, f"{name}: advertises {settings.advertise_host}, not {name}"
        else:  # replicas share the service name: each must advertise its own container address
            own_address = socket.gethostbyname(socket.gethostname())  # what it resolves to inside its container
            assert settings.advertise_host == own_address, f"{name}: replicas advertise {settings.advertise_host!r}"
        dependencies = service.get("depends_on", {})
        for url in (settings.consul_url,) if module in WITHOUT_REDIS else (settings.consul_url, settings.redis_url):
            assert urlsplit(url).hostname in dependencies, f"{name}: {url} is no dependency of it"
        ports = _ports(service)
        if module in INTERNAL_ONLY:
            assert not ports, f"{name}: only other containers call it, yet it publishes {ports}"
            assert str(settings.port) in _exposed(service), f"{name}: port {settings.port} is not exposed"
        else:
            published = {target for _, target in ports}
            assert str(settings.port) in published, f"{name}: port {settings.port} is not published"
        if _replicas(service) > 1:
            fixed = [host for host, _ in ports if host]
            assert not fixed, f"{name}: {_replicas(service)} replicas cannot all bind host ports {fixed}"
        assert f"127.0.0.1:{settings.port}" in service["healthcheck"]["test"], f"{name}: healthcheck misses its port"


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(compose: dict) -> None:
    for name, service in compose["services"].items():
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name}: no healthcheck"
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck {healthcheck['test']}"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name}: starts before {dependency} is healthy"


def test_dockerfile_installs_pinned_dependencies_and_generates_protos() -> None:
    instructions = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    runs = [line for line in instructions if line.startswith("RUN ")]
    assert any("pip install" in run and "-c constraints.txt" in run for run in runs), "pip install not pinned"
    assert any("scripts/gen-protos.sh" in run for run in runs), "protos are not generated in the image"
    assert any(line.startswith("USER ") and line.split()[1] not in ("root", "0") for line in instructions)
    assert "python:3.11-slim-bookworm" in DOCKERFILE.read_text()
    for line in instructions:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which the repo lacks"


def test_the_trainer_keeps_its_dirs_on_its_own_volume_and_shares_none_with_the_agents(
    our_services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No shared filesystem: data sets, checkpoints and exports move between the trainer and the agents through the
    registry, and a recipe's source travels in the worker spec. The trainer's scratch and recipes are on a named
    volume of its own (absolute paths), and no agent mounts it."""
    by_module = {_module_of(name, service): (name, service) for name, service in our_services.items()}
    trainer_name, trainer = by_module["services.trainer"]
    agent_name, agent = by_module["services.trainer.agent"]
    settings = _settings_of(trainer_name, trainer, monkeypatch)

    def named_volumes(service: dict) -> dict[str, str]:
        mounts = {}
        for volume in service.get("volumes", []):
            source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
            if not source.startswith(("/", ".")):
                mounts[source] = target
        return mounts

    trainer_volumes = named_volumes(trainer)
    for path in (settings.scratch_dir, settings.recipes_dir):
        assert path.is_absolute(), f"{trainer_name}: {path} is relative"
        assert any(path.is_relative_to(t) for t in trainer_volumes.values()), f"{trainer_name}: {path} on no volume"
    shared = set(trainer_volumes) & set(named_volumes(agent))
    assert not shared, f"{agent_name} mounts the trainer's volume(s) {shared}: nothing may be shared"
    assert _replicas(agent) * _settings_of(agent_name, agent, monkeypatch).slots >= 2, "too few worker slots"
