"""deploy/docker-compose.yml is valid for docker-compose and starts only what the local mesh also runs and tests,
with Consul deployed as on real hosts: one server, and a client agent in every service container.

No Docker engine runs here, so the file is checked statically: `docker-compose config` must accept it, each
service built from deploy/Dockerfile must run a module that `make up` (scripts/mesh.py) runs too, through the
entrypoint that starts the container's own Consul agent, and each MODELGRID_<SERVICE>_* variable it sets must be a
field of that service's settings class. The entrypoint itself (deploy/consul-agent.sh) is run here for real: against
a real Consul server on loopback, wrapping a small Python command in place of a service. So are the shell commands
that make the Redis password and start Redis with it, on a real redis-server.
"""

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.kit.consul_acl import AGENT, MASTER_TOKEN_FILE, read_token_file, write_token_file
from services.kit.localinfra import (
    ConsulAgent,
    InfraError,
    consul_binary,
    free_port,
    free_ports,
    pid_alive,
    redis_binary,
    redis_ping,
)
from services.kit.redis_auth import write_password_file
from services.kit.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
ENTRYPOINT_SCRIPT = REPO_ROOT / "deploy" / "consul-agent.sh"
MESH_SCRIPT = REPO_ROOT / "scripts" / "mesh.py"
ENV_PREFIX = "MODELGRID_"
CONSUL_SERVICE = "consul"
"""The compose service that is the Consul server."""
LOCAL_AGENT_URL = "http://127.0.0.1:8500"
"""Where a service finds the Consul agent of its own container (consul-agent.sh's default HTTP port)."""
DEREGISTER_ALLOWANCE_S = 2.0
"""Time a stopping service may take to deregister from its local agent, on top of its grace periods."""
LEAVE_ALLOWANCE_S = 8.0
"""Time `consul leave` and the agent's exit may take after the service has stopped (about 5 s measured here; the
behaviour test below fails if it takes longer)."""
PASSWORD_FILE_VARIABLE = "REDIS_PASSWORD_FILE"
"""The setting (after a service's prefix) that names the file holding the Redis password."""
STAND_IN_PASSWORD = "stand-in-for-the-compose-secret"
"""What the settings built here read from a Redis password file (the real one exists only in a container)."""
CONSUL_TOKEN_FILE_VARIABLE = "CONSUL_TOKEN_FILE"
"""The setting (after a service's prefix) that names the file holding the service's Consul ACL token."""
STAND_IN_TOKEN = "stand-in-for-a-consul-token"
"""What the settings built here read from a Consul token file (the real one exists only in a container)."""
CONSUL_ACL_SERVICE = "consul-acl"
"""The one-shot compose service that bootstraps Consul's ACLs and makes the tokens."""
WITHOUT_REDIS = {"services.trainer.agent"}
"""Modules that keep no state in Redis: their containers need not wait for it (they do need Consul)."""
INTERNAL_ONLY = {"services.registry", "services.predictor", "services.trainer", "services.trainer.agent"}
"""Modules only other containers call (the gateway calls the registry, predictors and trainer; the trainer calls the
agents): their port is exposed, not published. Only the gateway, with its auth and rate limits, is published."""


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
    """The compose services built from deploy/Dockerfile (not third-party images such as consul and redis), without
    the one-shot setup steps run from that image (consul-acl)."""
    ours = {
        name: service
        for name, service in compose["services"].items()
        if _built_from_our_dockerfile(service) and not _one_shot(service)
    }
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
    with monkeypatch.context() as env, tempfile.TemporaryDirectory() as secrets:
        for variable in [key for key in os.environ if key.startswith(prefix)]:
            env.delenv(variable)
        for variable, value in _modelgrid_variables(service).items():
            if value is not None and variable.endswith(PASSWORD_FILE_VARIABLE):
                value = str(Path(secrets) / Path(value).name)  # the container's file, with a stand-in password
                write_password_file(value, STAND_IN_PASSWORD)
            if value is not None and variable.endswith(CONSUL_TOKEN_FILE_VARIABLE):
                value = str(Path(secrets) / Path(value).name)  # the container's file, with a stand-in token
                write_token_file(Path(value), STAND_IN_TOKEN)
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
        # "auto" with a loopback agent: the address the container's own agent reports for its node, which is the
        # container's own (replicas share the service name, so each must advertise its own address).
        assert settings.advertise_host == "auto", f"{name}: advertises {settings.advertise_host!r}, not auto"
        dependencies = service.get("depends_on", {})
        if module not in WITHOUT_REDIS:
            redis_host = urlsplit(settings.redis_url).hostname
            assert redis_host in dependencies, f"{name}: {settings.redis_url} is no dependency of it"
        # Consul through the container's own agent, whose server must be up first.
        assert CONSUL_SERVICE in dependencies, f"{name}: does not wait for the Consul server"
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


def _one_shot(service: dict) -> bool:
    """A service that runs once and exits (a setup step): it never restarts."""
    return str(service.get("restart", "no")) == "no"


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        if _one_shot(service):  # done when it exited 0; what depends on it waits for that
            continue
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name}: no healthcheck"
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck {healthcheck['test']}"
        for dependency, condition in (service.get("depends_on") or {}).items():
            if _one_shot(services[dependency]):
                expected = {"condition": "service_completed_successfully"}
                assert condition == expected, f"{name}: starts before the one-shot {dependency} succeeded"
            else:
                assert condition == {"condition": "service_healthy"}, f"{name}: starts before {dependency} is healthy"


def test_dockerfile_installs_pinned_dependencies_and_generates_protos() -> None:
    instructions = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    runs = [line for line in instructions if line.startswith("RUN ")]
    assert any("pip install" in run and "-c constraints.txt" in run for run in runs), "pip install not pinned"
    # The client library's build generates the protocol code from protos/ (the image copies no generated code).
    assert any("pip install" in run and "./clients/python" in run for run in runs), "protos are not generated"
    assert any(line.startswith("COPY protos ") for line in instructions), "protos/ is not in the image's build"
    assert any(line.startswith("USER ") and line.split()[1] not in ("root", "0") for line in instructions)
    assert "python:3.11-slim-bookworm" in DOCKERFILE.read_text()
    for line in instructions:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which the repo lacks"


def test_the_trainer_keeps_its_dirs_on_its_own_volume_and_shares_none_with_the_agents(
    compose: dict, our_services: dict, monkeypatch: pytest.MonkeyPatch
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
    secrets = {source for source, _, read_only in _mounts(agent, compose) if read_only}  # read-only: the Consul tokens
    shared = set(trainer_volumes) & set(named_volumes(agent)) - secrets
    assert not shared, f"{agent_name} mounts the trainer's volume(s) {shared}: nothing may be shared"
    assert _replicas(agent) * _settings_of(agent_name, agent, monkeypatch).slots >= 2, "too few worker slots"


# -- Redis requires a password made at setup, which every service that uses Redis reads from a file ----------------

REDIS_SERVICE = "redis"


def _container_shell(text: str) -> str:
    """A shell command as the container runs it: compose reads `$$` as a literal `$`."""
    return text.replace("$$", "$")


def _shell_of(service: dict) -> str:
    return _container_shell(" ".join(_argv(service.get("entrypoint")) + _argv(service.get("command"))))


def _mounts(service: dict, compose: dict) -> list[tuple[str, str, bool]]:
    """(named volume, mount point, read-only) of a service's named volumes."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target, read_only = volume["source"], volume["target"], bool(volume.get("read_only"))
        else:
            source, target, *mode = volume.split(":")
            read_only = "ro" in (mode[0].split(",") if mode else [])
        if source in (compose.get("volumes") or {}):
            mounts.append((source, target, read_only))
    return mounts


def _volume_of(path: str, service: dict, compose: dict) -> tuple[str, bool] | None:
    """(named volume, read-only) that holds `path` in the service's container; None if no named volume does."""
    for source, target, read_only in _mounts(service, compose):
        if Path(path).is_relative_to(target):
            return source, read_only
    return None


def _password_maker(compose: dict) -> tuple[str, dict]:
    """The one-shot service that redis waits for: it makes the password."""
    redis = compose["services"][REDIS_SERVICE]
    makers = [
        dependency
        for dependency, condition in (redis.get("depends_on") or {}).items()
        if condition == {"condition": "service_completed_successfully"}
    ]
    assert len(makers) == 1, f"{REDIS_SERVICE} waits for no one-shot that makes its password: {redis.get('depends_on')}"
    return makers[0], compose["services"][makers[0]]


def _redis_password_path(compose: dict) -> str:
    """The file redis reads its password from (the `cat` in its command)."""
    command = _shell_of(compose["services"][REDIS_SERVICE])
    found = set(re.findall(r"\$\(cat (/[^)\s]+)\)", command))
    assert len(found) == 1, f"{REDIS_SERVICE}: expected its password from one file, found {found} in {command!r}"
    return found.pop()


def _services_uid() -> int:
    """The uid the services run as in the image (deploy/Dockerfile's useradd)."""
    found = re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text())
    assert found, f"{DOCKERFILE}: no useradd --uid"
    return int(found[1])


def test_redis_requires_a_password_made_at_setup_that_each_service_using_redis_reads(
    compose: dict, our_services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = compose["services"][REDIS_SERVICE]
    path = _redis_password_path(compose)
    assert re.search(r'--requirepass "\$password"', _shell_of(redis)), f"{REDIS_SERVICE}: no --requirepass"
    volume, read_only = _volume_of(path, redis, compose) or ("", False)
    assert volume and read_only, f"{REDIS_SERVICE}: {path} is on no named volume mounted read-only"
    maker_name, maker = _password_maker(compose)
    assert _one_shot(maker), f"{maker_name}: restarts ({maker.get('restart')}); it is a one-shot setup step"
    assert _volume_of(path, maker, compose) == (volume, False), f"{maker_name} does not write {path} on {volume}"
    assert path in _shell_of(maker) and "/dev/urandom" in _shell_of(maker), f"{maker_name} makes no random {path}"
    healthcheck = _container_shell(" ".join(redis["healthcheck"]["test"][1:]))
    assert "REDISCLI_AUTH=" in healthcheck and path in healthcheck, f"{REDIS_SERVICE}: healthcheck without password"
    for name, service in our_services.items():
        module = _module_of(name, service)
        prefix = _settings_class(module).model_config["env_prefix"]
        environment = _environment(service)
        if module in WITHOUT_REDIS:
            assert f"{prefix}{PASSWORD_FILE_VARIABLE}" not in environment, f"{name}: keeps nothing in Redis"
            assert _volume_of(path, service, compose) is None, f"{name}: mounts the Redis password it does not use"
            continue
        assert environment.get(f"{prefix}{PASSWORD_FILE_VARIABLE}") == path, f"{name}: not given {path}"
        assert _volume_of(path, service, compose) == (volume, True), f"{name}: {path} not on {volume}, read-only"
        assert urlsplit(environment[f"{prefix}REDIS_URL"]).password is None, f"{name}: a password in the file"
        settings = _settings_of(name, service, monkeypatch)
        assert urlsplit(settings.redis_url).password == STAND_IN_PASSWORD, f"{name}: the file's password is unused"


def test_the_password_maker_and_the_redis_command_run_for_real(compose: dict, tmp_path: Path) -> None:
    """The one-shot's script and redis's command, run here as the containers run them (the secrets volume a temporary
    dir; the image's entrypoint a stand-in that runs redis-server on a free loopback port)."""
    if os.geteuid() != 0:
        pytest.skip("the one-shot gives the file to the services' user: it runs as root, as in its container")
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("redis-cli not found: install Debian's redis-tools (`make setup` does)")
    path = _redis_password_path(compose)
    secrets = tmp_path / "secrets"
    secrets.mkdir()

    def here(text: str) -> str:
        return _container_shell(text).replace(str(Path(path).parent) + "/", f"{secrets}/")

    _, maker = _password_maker(compose)
    maker_argv = [here(part) for part in _argv(maker.get("entrypoint")) + _argv(maker.get("command"))]

    def make(**env: str) -> str:
        result = subprocess.run(maker_argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return (secrets / Path(path).name).read_text()

    password = make()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", password), "not 32 random bytes in URL-safe base64"
    made = (secrets / Path(path).name).stat()
    assert stat.S_IMODE(made.st_mode) == 0o400 and made.st_uid == _services_uid()
    assert make() == password, "a second `up` made a new password"
    assert make(REDIS_PASSWORD_ROTATE="1") != password
    password = make()

    port, stubs, data = free_port(), tmp_path / "bin", tmp_path / "data"
    stubs.mkdir()
    data.mkdir()
    stand_ins = {
        "docker-entrypoint.sh": f'exec "$@" --port {port} --bind 127.0.0.1 --dir {data} --daemonize no',
        "redis-server": f'exec {redis_binary()} "$@"',
        "redis-cli": f'exec {redis_cli} -p {port} "$@"',
    }
    for name, line in stand_ins.items():
        (stubs / name).write_text(f"#!/bin/sh\n{line}\n")
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    redis = compose["services"][REDIS_SERVICE]
    redis_argv = [here(part) for part in _argv(redis["command"])]
    healthcheck = ["sh", "-c", here(redis["healthcheck"]["test"][1])]
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        server = subprocess.Popen(redis_argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not redis_ping("127.0.0.1", port, password=password):
            assert server.poll() is None, f"redis exited ({server.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"redis did not answer:\n{log.read_text()}"
            time.sleep(0.05)
        assert not redis_ping("127.0.0.1", port), "redis answers a client without the password"
        health = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, f"healthcheck failed: {health.stdout}{health.stderr}"
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert password not in log.read_text()

    (secrets / Path(path).name).write_text("")  # an empty password would be no password: redis must not start
    refused = subprocess.run(redis_argv, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0


# -- Consul as on real hosts: one server, a client agent in every service container ----------------------------

DOCKER_PATH_DIRS = {"/usr/local/bin", "/usr/bin", "/bin"}
"""Directories on the PATH of the runtime image (python:3.11-slim-bookworm), where `consul` must be found."""
BOOLEAN_CONSUL_FLAGS = {"server", "ui", "dev", "bootstrap"}


def _argv(value: str | list | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def _consul_flags(argv: list[str]) -> dict[str, list[str]]:
    """Consul's command-line flags (`-flag=value`, `-flag value`, or a bare boolean `-flag`), each with its values."""
    flags: dict[str, list[str]] = {}
    arguments = iter(argv)
    for argument in arguments:
        assert argument.startswith("-"), f"consul agent: unexpected argument {argument!r} in {argv}"
        name, has_value, value = argument.lstrip("-").partition("=")
        if not has_value and name not in BOOLEAN_CONSUL_FLAGS:
            value = next(arguments, "")
        flags.setdefault(name, []).append(value)
    return flags


def _named_volumes(service: dict, compose: dict) -> dict[str, str]:
    """{volume name: mount point} of the service's named volumes (not bind mounts)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if source in (compose.get("volumes") or {}):
            mounts[source] = target
    return mounts


def _published_host_ips(service: dict) -> list[str]:
    """The host address each `ports` entry publishes on ("" for every address)."""
    addresses = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            addresses.append(str(port.get("host_ip") or ""))
        else:
            parts = str(port).split("/")[0].split(":")
            addresses.append(parts[0] if len(parts) == 3 else "")
    return addresses


def _seconds(duration: str | int | float) -> float:
    """A compose duration ("20s", "1m30s", "500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"cannot read the duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _script_default(variable: str) -> str:
    """The default consul-agent.sh uses for an environment variable: the `word` of its `${VARIABLE:-word}`."""
    defaults = set(re.findall(r"\$\{" + variable + r":-([^}]*)\}", ENTRYPOINT_SCRIPT.read_text()))
    assert len(defaults) == 1, f"{ENTRYPOINT_SCRIPT.name}: expected one default for ${variable}, found {defaults}"
    return defaults.pop()


def _dockerfile() -> tuple[list[str], dict[str, str]]:
    """The Dockerfile's instructions (continuation lines joined) and its stages {name: image} (ARGs expanded)."""
    instructions = [line.strip() for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()]
    instructions = [line for line in instructions if line and not line.startswith("#")]
    arguments: dict[str, str] = {}
    stages: dict[str, str] = {}
    for line in instructions:
        words = line.split()
        if words[0] == "ARG" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            arguments.setdefault(name, value)
        elif words[0] == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: arguments[m[1] or m[2]], words[1])
            if len(words) >= 4 and words[2].upper() == "AS":
                stages[words[3]] = image
    return instructions, stages


def _copies(instructions: list[str]) -> list[tuple[str | None, list[str], str]]:
    """(--from value or None, sources, destination) of each COPY."""
    copies = []
    for line in instructions:
        words = line.split()
        if words[0] != "COPY":
            continue
        options = [word for word in words[1:] if word.startswith("--")]
        paths = [word for word in words[1:] if not word.startswith("--")]
        origin = next((option.split("=", 1)[1] for option in options if option.startswith("--from=")), None)
        copies.append((origin, paths[:-1], paths[-1]))
    return copies


def _entrypoint_in_image() -> str:
    """Where the Dockerfile puts deploy/consul-agent.sh in the image."""
    instructions, _ = _dockerfile()
    targets = [
        destination
        for origin, sources, destination in _copies(instructions)
        if origin is None and sources == [str(ENTRYPOINT_SCRIPT.relative_to(REPO_ROOT))]
    ]
    assert len(targets) == 1, f"{DOCKERFILE} should copy {ENTRYPOINT_SCRIPT.name} into the image once: {targets}"
    return targets[0]


def test_consul_is_one_server_that_keeps_its_state_on_a_named_volume(compose: dict) -> None:
    consul = compose["services"][CONSUL_SERVICE]
    assert consul["image"].startswith("consul:"), f"{CONSUL_SERVICE}: image {consul['image']}"
    argv = _argv(consul.get("command"))
    assert argv[:1] == ["agent"], f"{CONSUL_SERVICE}: command {argv} does not run `consul agent`"
    flags = _consul_flags(argv[1:])
    assert "dev" not in flags, f"{CONSUL_SERVICE}: a -dev agent keeps everything in memory and is no real server"
    assert "server" in flags, f"{CONSUL_SERVICE}: not a server ({argv})"
    assert flags.get("bootstrap-expect") == ["1"], f"{CONSUL_SERVICE}: a single server must expect 1 ({argv})"
    assert "ui" in flags, f"{CONSUL_SERVICE}: no UI"
    assert flags.get("client") == ["0.0.0.0"], f"{CONSUL_SERVICE}: API not reachable through its published port"
    data_dir = (flags.get("data-dir") or [""])[-1]
    assert data_dir.startswith("/"), f"{CONSUL_SERVICE}: no absolute -data-dir ({argv})"
    assert data_dir in _named_volumes(consul, compose).values(), f"{CONSUL_SERVICE}: {data_dir} is on no named volume"
    addresses = _published_host_ips(consul)
    assert addresses and set(addresses) == {"127.0.0.1"}, f"{CONSUL_SERVICE}: publishes beyond loopback: {addresses}"
    assert "/v1/status/leader" in " ".join(consul["healthcheck"]["test"]), f"{CONSUL_SERVICE}: no wait for a leader"


CONSUL_NAMES = {
    "services.registry": "registry",
    "services.predictor": "predictor",
    "services.trainer.agent": "trainer-agent",
    "services.trainer": "trainer",
    "services.gateway": "gateway",
}
"""The Consul service name each module registers under: its ACL token may register that name only."""


def _acl_setup(compose: dict) -> tuple[list[str], dict[str, str], list[str]]:
    """The consul-acl one-shot's argv, its --options and the service names it makes tokens for."""
    maker = compose["services"][CONSUL_ACL_SERVICE]
    argv = [*_argv(maker.get("entrypoint")), *_argv(maker.get("command"))]
    options = dict(argument.split("=", 1) for argument in argv[4:] if argument.startswith("--"))
    names = [argument for argument in argv[4:] if not argument.startswith("-")]
    return argv, options, names


def _consul_acl_hcl(compose: dict) -> list[str]:
    """The -hcl snippets of the Consul server that configure its ACLs."""
    flags = _consul_flags(_argv(compose["services"][CONSUL_SERVICE]["command"])[1:])
    return [hcl for hcl in flags.get("hcl", []) if hcl.lstrip().startswith("acl")]


def test_consul_denies_by_default_and_each_service_has_a_token_of_its_own(compose: dict, our_services: dict) -> None:
    hcl = " ".join(_consul_acl_hcl(compose))
    assert re.search(r"enabled\s*=\s*true", hcl), f"{CONSUL_SERVICE}: ACLs are off ({hcl!r})"
    assert re.search(r'default_policy\s*=\s*"deny"', hcl), f"{CONSUL_SERVICE}: ACLs allow by default ({hcl!r})"
    assert "tokens" not in hcl, f"{CONSUL_SERVICE}: a token in its command line ({hcl!r}); consul-acl bootstraps"

    maker = compose["services"][CONSUL_ACL_SERVICE]
    argv, options, names = _acl_setup(compose)
    assert _one_shot(maker), f"{CONSUL_ACL_SERVICE}: restarts; it is a one-shot setup step"
    assert argv[:4] == ["python", "-m", "services.kit.consul_acl", "setup"], f"{CONSUL_ACL_SERVICE}: runs {argv}"
    assert urlsplit(options["--consul-url"]).hostname == CONSUL_SERVICE, f"{CONSUL_ACL_SERVICE}: {options}"
    assert maker["depends_on"] == {CONSUL_SERVICE: {"condition": "service_healthy"}}
    master_volume, read_only = _volume_of(options["--master-dir"], maker, compose) or ("", True)
    token_volume, tokens_read_only = _volume_of(options["--token-dir"], maker, compose) or ("", True)
    assert master_volume and token_volume and not read_only and not tokens_read_only, f"{CONSUL_ACL_SERVICE}: volumes"
    for name, service in compose["services"].items():
        if name != CONSUL_ACL_SERVICE:
            assert master_volume not in _named_volumes(service, compose), f"{name} mounts the Consul master token"

    for name, service in our_services.items():
        module = _module_of(name, service)
        prefix = _settings_class(module).model_config["env_prefix"]
        environment = _environment(service)
        token_file = environment.get(f"{prefix}{CONSUL_TOKEN_FILE_VARIABLE}") or ""
        assert Path(token_file).name == CONSUL_NAMES[module] in names, f"{name}: Consul token file {token_file!r}"
        agent_token_file = environment.get("CONSUL_AGENT_TOKEN_FILE") or ""
        assert Path(agent_token_file).name == AGENT, f"{name}: its agent has no token ({agent_token_file!r})"
        for path in (token_file, agent_token_file):
            assert _volume_of(path, service, compose) == (token_volume, True), f"{name}: {path} not on {token_volume}"
        condition = (service.get("depends_on") or {}).get(CONSUL_ACL_SERVICE)
        assert condition == {"condition": "service_completed_successfully"}, f"{name}: starts before the tokens"


def test_the_acl_setup_bootstraps_a_real_server_and_keeps_its_tokens(compose: dict, tmp_path: Path) -> None:
    """consul-acl's command against a real Consul server with the compose file's ACL configuration (a dev agent on
    loopback): it bootstraps, makes the tokens (mode 0600), keeps them on a second run, and a service's token may
    register its own name only."""
    try:
        binary = consul_binary()
    except InfraError as exc:
        pytest.skip(str(exc))
    http_port, serf_lan, serf_wan, server_port = free_ports(4)
    hcl = [f"-hcl={snippet}" for snippet in _consul_acl_hcl(compose)]
    command = [binary, "agent", "-dev", "-client=127.0.0.1", "-bind=127.0.0.1", f"-http-port={http_port}"]
    command += [f"-serf-lan-port={serf_lan}", f"-serf-wan-port={serf_wan}", f"-server-port={server_port}"]
    command += ["-dns-port=-1", "-grpc-port=-1", "-hcl=disable_update_check = true", *hcl]
    url = f"http://127.0.0.1:{http_port}"
    argv, options, names = _acl_setup(compose)
    setup = [sys.executable, *argv[1:4], f"--consul-url={url}", f"--master-dir={tmp_path / 'master'}"]
    setup += [f"--token-dir={tmp_path / 'tokens'}", "--wait=30", *names]
    with (tmp_path / "consul.log").open("wb") as log:
        # In tmp_path: a dev agent persisting ACL tokens writes acl-tokens.json to its working directory.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        first = subprocess.run(setup, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        files = [tmp_path / "master" / MASTER_TOKEN_FILE, *(tmp_path / "tokens" / name for name in (AGENT, *names))]
        tokens = {path: read_token_file(path) for path in files}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert len(set(tokens.values())) == len(files)
        assert not any(token in first.stdout + first.stderr for token in tokens.values()), "a token was printed"

        again = subprocess.run(setup, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert {path: read_token_file(path) for path in files} == tokens, "a second run changed the tokens"

        def register(name: str, token: str) -> int:
            body = json.dumps({"ID": f"{name}-probe", "Name": name, "Port": 1}).encode()
            request = urllib.request.Request(f"{url}/v1/agent/service/register", data=body, method="PUT")
            request.add_header("X-Consul-Token", token)
            try:
                with _NO_PROXY.open(request, timeout=5) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        registry_token = tokens[tmp_path / "tokens" / "registry"]
        assert register("registry", registry_token) == 200
        assert register("predictor", registry_token) == 403, "the registry's token registered a predictor"
        assert register("predictor", "") == 403, "an anonymous caller registered a predictor"
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_every_service_runs_through_the_entrypoint_that_starts_its_own_consul_agent(
    compose: dict, our_services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = _entrypoint_in_image()
    assert LOCAL_AGENT_URL == f"http://127.0.0.1:{_script_default('CONSUL_AGENT_HTTP_PORT')}"
    for name, service in our_services.items():
        assert _argv(service.get("entrypoint")) == [entrypoint], f"{name}: entrypoint is not {entrypoint}"
        assert _module_of(name, service)  # the command is still the service (python -m ...), the script's arguments
        assert service.get("init") is True, f"{name}: no init to pass SIGTERM on to the entrypoint and reap orphans"
        settings = _settings_of(name, service, monkeypatch)
        assert settings.consul_enabled, f"{name}: does not register in Consul"
        assert settings.consul_url.rstrip("/") == LOCAL_AGENT_URL, f"{name}: Consul at {settings.consul_url}"
        environment = _environment(service)
        for server in (environment.get("CONSUL_AGENT_JOIN") or _script_default("CONSUL_AGENT_JOIN")).split():
            host = server.rsplit(":", 1)[0] if server.count(":") == 1 else server
            assert host == CONSUL_SERVICE, f"{name}: its agent joins {server}, not the {CONSUL_SERVICE} server"
            assert host in (service.get("depends_on") or {}), f"{name}: starts before the Consul server"
        for variable, value in _modelgrid_variables(service).items():
            if variable.endswith("_ADVERTISE_HOST"):
                assert value != "", f"{name}: {variable} is empty (the old own-hostname trick); use auto"


def test_dockerfile_puts_the_consul_binary_and_the_entrypoint_into_the_image(compose: dict) -> None:
    instructions, stages = _dockerfile()
    binaries = [
        (origin, destination)
        for origin, sources, destination in _copies(instructions)
        if origin is not None and Path(destination).name == "consul" and any(s.endswith("/consul") for s in sources)
    ]
    assert len(binaries) == 1, f"{DOCKERFILE} should copy one consul binary from the official image: {binaries}"
    origin, destination = binaries[0]
    image = stages.get(origin, origin)
    assert image == compose["services"][CONSUL_SERVICE]["image"], (
        f"the agents' consul comes from {image}, the server runs {compose['services'][CONSUL_SERVICE]['image']}"
    )
    assert str(Path(destination).parent) in DOCKER_PATH_DIRS, f"consul goes to {destination}, not on the PATH"
    assert _script_default("CONSUL_AGENT_BIN") == "consul", "the entrypoint does not run the consul on the PATH"
    entrypoint = _entrypoint_in_image()
    runs = [line for line in instructions if line.startswith("RUN ")]
    assert any("chmod" in run and entrypoint in run for run in runs), f"{entrypoint} is not made executable"


def test_entrypoint_script_is_valid_bash() -> None:
    assert ENTRYPOINT_SCRIPT.read_text().startswith("#!/bin/bash\n"), "the image has bash at /bin/bash"
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_stop_grace_periods_cover_the_ordered_stop_and_the_leave(
    our_services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in our_services.items():
        settings = _settings_of(name, service, monkeypatch)
        needed = (
            settings.shutdown_grace_seconds
            + getattr(settings, "worker_stop_grace_seconds", 0.0)  # an agent's workers save a checkpoint
            + DEREGISTER_ALLOWANCE_S
            + LEAVE_ALLOWANCE_S
        )
        grace = _seconds(service.get("stop_grace_period", "10s"))
        assert grace >= needed, f"{name}: stop_grace_period {grace:.0f}s < {needed:.0f}s: SIGKILL cuts the stop"


# -- deploy/consul-agent.sh run for real: a client agent joined to a real Consul server on loopback ------------

CLIENT_BIND = "127.0.0.2"
"""The test client agent's gossip address: loopback, yet not the server's (127.0.0.1) nor hostaddr's fallback."""
ALIVE, LEFT = 1, 3  # serf member status, as /v1/agent/members reports it
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Stands in for a service: registers with the local agent, records what it sees, and on SIGTERM deregisters (as a
# service's ordered stop does; the agent must still answer) and exits with the given code. In "exit" mode it exits
# by itself once <record>.exit exists.
PROBE = r"""
import asyncio, json, os, signal, sys, time, urllib.request
from services.kit.hostaddr import host_address

agent_url, record_path, exit_code, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
record = {}

def call(path, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"X-Consul-Token": os.environ["CONSUL_HTTP_TOKEN"]}  # its own token: Consul denies by default
    request = urllib.request.Request(agent_url + path, data=data, method=method, headers=headers)
    with http.open(request, timeout=5) as response:
        return json.loads(response.read() or b"null")

def save():
    with open(record_path + ".tmp", "w") as out:
        json.dump(record, out)
    os.replace(record_path + ".tmp", record_path)

def stop(*_):
    try:
        call("/v1/agent/service/deregister/compose-probe-1", "PUT")
        record["deregistered_from"] = call("/v1/agent/self")["Config"]["NodeName"]
    except OSError as exc:
        record["stop_error"] = repr(exc)
    record["stopped_at"] = time.time()
    save()
    sys.exit(exit_code)

signal.signal(signal.SIGTERM, stop)
call("/v1/agent/service/register", "PUT", {"ID": "compose-probe-1", "Name": "compose-probe", "Port": 1})
record["node"] = call("/v1/agent/self")["Config"]["NodeName"]
record["advertise_host"] = asyncio.run(host_address(agent_url))  # what ADVERTISE_HOST=auto resolves to
save()
while not (mode == "exit" and os.path.exists(record_path + ".exit")):
    time.sleep(0.05)
record["exited_at"] = time.time()
save()
sys.exit(exit_code)
"""


class EntrypointRun:
    """deploy/consul-agent.sh running in a process group of its own, with its client agent on free loopback ports."""

    popen: subprocess.Popen

    def __init__(self, node: str, agent_url: str, log: Path) -> None:
        self.node, self.agent_url, self.log = node, agent_url, log

    def probe(self, record: Path, exit_code: int, mode: str = "term") -> list[str]:
        return [sys.executable, "-c", PROBE, self.agent_url, str(record), str(exit_code), mode]

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 30.0, running: bool = True) -> Any:
        """The first truthy value of `condition()`; fails after `timeout` or, if `running`, when the script exits."""
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if running:
                assert self.popen.poll() is None, f"the entrypoint exited ({self.popen.returncode}):\n{self.log_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}; entrypoint log:\n{self.log_text()}"
            time.sleep(0.1)
        return value

    def group(self) -> list[int]:
        """Live processes of the entrypoint's process group (the script, its agent, the wrapped command)."""
        return _group_pids(self.popen.pid)

    def agent_pid(self) -> int:
        def find() -> int | None:
            for pid in self.group():
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if Path(argv[0].decode()).name == "consul" and argv[1:2] == [b"agent"]:
                    return pid
            return None

        return self.wait_for(find, "the client agent's process")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def consul_server(tmp_path_factory) -> Iterator[ConsulAgent]:
    """A real Consul server (a dev agent is one) on free loopback ports, for the client agents to join."""
    try:
        consul_binary()
    except InfraError as exc:
        pytest.skip(str(exc))
    with ConsulAgent(tmp_path_factory.mktemp("consul-server")) as server:
        yield server


@pytest.fixture
def entrypoint(consul_server: ConsulAgent, tmp_path: Path) -> Iterator[Callable[..., EntrypointRun]]:
    """`entrypoint(command_of, **env)`: runs consul-agent.sh around `command_of(run)` (a command list); every
    process it left behind is killed by pid when the test ends."""
    runs: list[EntrypointRun] = []

    def start(command_of: Callable[[EntrypointRun], list[str]], **env: str) -> EntrypointRun:
        http_port, serf_port = free_ports(2)
        node = f"compose-test-{uuid.uuid4().hex[:8]}"
        environment = {
            **os.environ,
            "CONSUL_AGENT_BIN": consul_binary(),
            "CONSUL_AGENT_JOIN": f"127.0.0.1:{consul_server.serf_lan_port}",
            "CONSUL_AGENT_BIND": CLIENT_BIND,
            "CONSUL_AGENT_HTTP_PORT": str(http_port),
            "CONSUL_AGENT_SERF_PORT": str(serf_port),
            "CONSUL_AGENT_NODE": node,
            "CONSUL_AGENT_DATA_DIR": str(tmp_path / f"{node}-data"),
            "CONSUL_AGENT_LOG_LEVEL": "info",
            # ACLs on, as on the server: the agent's token, and the wrapped command's own (the probe's service)
            "CONSUL_AGENT_TOKEN_FILE": str(consul_server.token_file(AGENT)),
            "CONSUL_HTTP_TOKEN": consul_server.token_for("compose-probe"),
            **env,
        }
        run = EntrypointRun(node, f"http://127.0.0.1:{http_port}", tmp_path / f"{node}.log")
        with run.log.open("wb") as out:
            run.popen = subprocess.Popen(
                ["bash", str(ENTRYPOINT_SCRIPT), *command_of(run)],
                cwd=REPO_ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: what it leaves behind is found by pgid
            )
        runs.append(run)
        return run

    yield start
    for run in runs:
        for pid in run.group():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            run.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _server_get(server: ConsulAgent, path: str) -> Any:
    request = urllib.request.Request(f"{server.http_url}{path}", headers={"X-Consul-Token": server.master_token})
    with _NO_PROXY.open(request, timeout=5) as response:
        return json.load(response)


def _member_status(server: ConsulAgent, node: str) -> int | None:
    return next((m["Status"] for m in _server_get(server, "/v1/agent/members") if m["Name"] == node), None)


def _catalog_nodes(server: ConsulAgent) -> set[str]:
    return {n["Node"] for n in _server_get(server, "/v1/catalog/nodes")}


def _node_checks(server: ConsulAgent, node: str) -> set[str]:
    return {check["CheckID"] for check in _server_get(server, f"/v1/health/node/{node}")}


def _probe_nodes(server: ConsulAgent) -> list[str]:
    return [entry["Node"] for entry in _server_get(server, "/v1/catalog/service/compose-probe")]


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _assert_left(server: ConsulAgent, run: EntrypointRun, agent_pid: int) -> None:
    """The client agent is gone, nothing of the run is left, and the server saw the node leave (not fail)."""
    assert not pid_alive(agent_pid), "the client agent still runs after the entrypoint exited"
    assert not run.group(), f"processes left behind: {run.group()}"
    assert _member_status(server, run.node) == LEFT, f"{run.node} did not leave:\n{run.log_text()}"

    # The server deregistered the left member: its serfHealth check is gone. (Not asserted: that the node's catalog
    # entry is gone. Consul 1.8's anti-entropy may sync the node's info once more while the agent leaves, and the
    # leader drops that entry again only at its next reconcile, within a minute.)
    def deregistered() -> bool:
        return "serfHealth" not in _node_checks(server, run.node)

    run.wait_for(deregistered, "the server to deregister the node", 15, running=False)


def test_entrypoint_joins_the_server_then_on_sigterm_stops_the_service_before_the_agent_leaves(
    consul_server: ConsulAgent, entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    run = entrypoint(lambda r: r.probe(record, exit_code=7))
    started = run.wait_for(lambda: _read_record(record), "the wrapped command to start", 60)
    assert started["node"] == run.node
    # The address a service with ADVERTISE_HOST=auto advertises is the agent's gossip address (the container's).
    assert started["advertise_host"] == CLIENT_BIND
    run.wait_for(lambda: _member_status(consul_server, run.node) == ALIVE, "the server to see the client alive")
    assert run.node in _catalog_nodes(consul_server)
    run.wait_for(lambda: _probe_nodes(consul_server) == [run.node], "the registration to reach the server")
    agent_pid = run.agent_pid()

    os.kill(run.popen.pid, signal.SIGTERM)
    status = run.popen.wait(timeout=30)
    exited_at = time.time()

    assert status == 7, f"exit status {status} is not the wrapped command's:\n{run.log_text()}"
    stopped = _read_record(record)
    assert stopped and "stopped_at" in stopped, f"the wrapped command got no SIGTERM:\n{run.log_text()}"
    # The agent still answered during the service's stop: deregistration reached it before the leave.
    assert stopped.get("deregistered_from") == run.node, stopped
    leave_seconds = exited_at - stopped["stopped_at"]
    assert leave_seconds < LEAVE_ALLOWANCE_S, f"the leave took {leave_seconds:.1f}s; stop_grace_period assumes less"
    _assert_left(consul_server, run, agent_pid)
    assert _probe_nodes(consul_server) == []


def test_entrypoint_leaves_and_exits_with_the_status_of_a_service_that_stops_by_itself(
    consul_server: ConsulAgent, entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    run = entrypoint(lambda r: r.probe(record, exit_code=3, mode="exit"))
    run.wait_for(lambda: _read_record(record), "the wrapped command to start", 60)
    run.wait_for(lambda: _member_status(consul_server, run.node) == ALIVE, "the server to see the client alive")
    agent_pid = run.agent_pid()

    Path(f"{record}.exit").touch()
    status = run.popen.wait(timeout=30)

    assert status == 3, f"exit status {status} is not the wrapped command's:\n{run.log_text()}"
    assert "exited_at" in (_read_record(record) or {})
    _assert_left(consul_server, run, agent_pid)


def test_entrypoint_stops_the_service_when_its_agent_dies(
    consul_server: ConsulAgent, entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    run = entrypoint(lambda r: r.probe(record, exit_code=0))
    run.wait_for(lambda: _read_record(record), "the wrapped command to start", 60)

    os.kill(run.agent_pid(), signal.SIGKILL)
    status = run.popen.wait(timeout=30)

    stopped = _read_record(record) or {}
    assert "stopped_at" in stopped, f"the wrapped command was not stopped:\n{run.log_text()}"
    # The service exited 0, but the container must not look cleanly stopped: the restart policy brings both back.
    assert status == 1, f"exit status {status}:\n{run.log_text()}"
    assert "the Consul agent exited" in run.log_text()
    assert not run.group(), f"processes left behind: {run.group()}"


def test_entrypoint_gives_up_when_the_agent_never_answers(
    entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    fake = tmp_path / "consul"  # a consul whose agent runs but never answers; `consul info` and `leave` fail
    fake.write_text('#!/bin/sh\n[ "$1" = agent ] && exec sleep 60\nexit 1\n')
    fake.chmod(0o755)
    marker = tmp_path / "service-ran"
    run = entrypoint(
        lambda r: [sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        CONSUL_AGENT_BIN=str(fake),
        CONSUL_AGENT_WAIT_SECONDS="1",
    )
    started = time.monotonic()
    status = run.popen.wait(timeout=30)

    assert status == 1, f"exit status {status}:\n{run.log_text()}"
    assert time.monotonic() - started < 15, "the wait for the agent is not bounded"
    assert "did not answer" in run.log_text(), run.log_text()
    assert not marker.exists(), "the service ran without a Consul agent"
    assert not run.group(), f"processes left behind (the agent that never answered?): {run.group()}"


# -- internal mTLS ---------------------------------------------------------------------------------------------


def test_internal_services_use_mtls_from_a_one_shot_whose_ca_key_no_service_mounts(
    compose: dict, our_services: dict
) -> None:
    maker = compose["services"]["mesh-tls"]
    assert _one_shot(maker), "mesh-tls restarts; it is a one-shot setup step"
    assert maker["entrypoint"][-1] == "services.kit.tls" and maker["command"][0] == "init"
    assert _volume_of("/mesh-ca/ca-key.pem", maker, compose) == ("mesh-ca", False)
    for name, service in compose["services"].items():
        if name != "mesh-tls":
            assert _volume_of("/mesh-ca/ca-key.pem", service, compose) is None, f"{name} mounts the CA's key"
    for name, service in our_services.items():
        module = _module_of(name, service)
        prefix = _settings_class(module).model_config["env_prefix"]
        environment = _environment(service)
        assert environment.get(f"{prefix}INTERNAL_TLS_DIR") == "/mesh-tls", f"{name}: no internal mTLS"
        assert environment.get("CONSUL_AGENT_TLS_DIR") == "/mesh-tls", f"{name}: its agent's checks have no cert"
        assert _volume_of("/mesh-tls/ca.pem", service, compose) == ("mesh-tls", True), f"{name}: certificates"
        assert service["depends_on"]["mesh-tls"]["condition"] == "service_completed_successfully", name
        probe = service["healthcheck"]["test"]
        if module != "services.gateway":  # the gateway's port is public: its probe stays plaintext
            assert probe[-1] == "/mesh-tls", f"{name}: its healthcheck cannot pass mTLS"


def test_the_certificate_maker_and_the_healthcheck_probe_run_for_real(compose: dict, tmp_path: Path) -> None:
    """The one-shot's command makes the CA apart from the certificates; the healthcheck probe, run as the registry's
    container runs it, passes against a real mTLS health endpoint and fails without the certificates."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from services.kit import tls

    maker = compose["services"]["mesh-tls"]
    command = [
        arg.replace("/mesh-ca", str(tmp_path / "ca")).replace("/mesh-tls", str(tmp_path / "certs"))
        for arg in maker["command"]
    ]
    subprocess.run([sys.executable, "-m", "services.kit.tls", *command], check=True, cwd=REPO_ROOT, timeout=60)
    certs = tmp_path / "certs"
    assert tls.key_path(tmp_path / "ca", "ca").is_file() and not tls.key_path(certs, "ca").exists()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.InternalTLS(certs, "registry").server_credentials())
    server.start()
    try:
        test = compose["services"]["registry"]["healthcheck"]["test"]
        probe, service = test[3], test[5]

        def run(*args: str) -> int:
            return subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO_ROOT, timeout=60).returncode

        assert run(f"127.0.0.1:{port}", service, str(certs)) == 0
        assert run(f"127.0.0.1:{port}") != 0  # plaintext is refused
    finally:
        server.stop(0)
