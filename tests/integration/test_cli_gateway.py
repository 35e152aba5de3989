"""The `modelgrid` commands that go through a gateway with API keys: canary weights (followed by the gateway's
routing), API keys, models delete/update, tags, TLS to a gateway with a certificate, and profiles of a config file.

One mesh for the module: its own Consul, a registry, one predictor serving a model's production and canary
versions, and two gateways with auth on that share their keys through Redis, one plaintext and one with a
certificate signed by a CA this module makes. The CLI runs in-process (`run`) and, where the environment and the
console script matter (profiles, a stdin that is no terminal), as the installed `modelgrid` subprocess.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.cli.main import run
from services.kit.localinfra import ConsulAgent, free_port
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow

ADMIN_KEY = "cli-gateway-admin-key-for-tests"
CLIENT_ID = "cli-gateway-test@pytest"
X = [[0.5, -1.0, 2.0, 0.1]]
SCRIPT = Path(sys.executable).parent / "modelgrid"


def _wait_predicts(channel: grpc.Channel, refs: list[str], timeout: float = 120) -> None:
    """Until the gateway routes a prediction of each ref (the predictor registered and serves them)."""
    stub = predictor_pb2_grpc.PredictorStub(channel)
    deadline = time.monotonic() + timeout
    for ref in refs:
        request = ppb.PredictRequest(model=ref_to_pb(ref), inputs={"x": array_to_tensor(np.array(X, np.float32))})
        while True:
            try:
                stub.Predict(request, metadata=(("authorization", f"Bearer {ADMIN_KEY}"),), timeout=10)
                break
            except grpc.RpcError as err:
                assert time.monotonic() < deadline, f"{ref} never answered through the gateway: {err}"
                time.sleep(0.3)


@pytest.fixture(scope="module")
def mesh(
    internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, gateway_certificate
):
    tmp = tmp_path_factory.mktemp("cli-gateway")
    ca, cert, key = gateway_certificate(tmp / "public-tls")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        name = unique("canaried")
        client.ensure_model(name)
        for seed in (1, 2):
            client.push_savedmodel(name, build_saved_model(tmp / f"m{seed}", seed=seed))
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=name, alias="production", version=1))
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=name, alias="canary", version=2))
        keys = {"AUTH_ENABLED": "true", "ADMIN_KEY": ADMIN_KEY, "REDIS_KEY_PREFIX": f"mg:test-cli:{unique('k')}:"}
        with launch.together():
            models = [{"name": name, "aliases": ["production", "canary"]}]
            predictor = launch.predictor(consul.http_url, redis_server.url, tmp / "p", models)
            plain = launch.gateway(consul.http_url, redis_server.url, tmp, **keys)
            secure = launch.gateway(
                consul.http_url, redis_server.url, tmp, ca.read_bytes(), TLS_CERT=str(cert), TLS_KEY=str(key), **keys
            )
        try:
            with grpc.insecure_channel(plain.target) as gateway_channel:
                _wait_predicts(gateway_channel, [f"{name}@production", f"{name}@canary"])
            (tmp / "x.json").write_text(json.dumps(X))
            yield SimpleNamespace(
                tmp=tmp, name=name, plain=plain.target, secure=secure.target, ca=ca, client=client, x=tmp / "x.json"
            )
        finally:
            for process in (secure, plain, predictor):
                process.stop()
            channel.close()
            registry.stop()


@pytest.fixture(autouse=True)
def cli_environment(monkeypatch, tmp_path) -> None:
    """Output as when piped; no setting from the caller's environment or config file: HOME is a fresh directory."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    for variable in [v for v in os.environ if v.startswith("MODELGRID_")] + ["XDG_CONFIG_HOME"]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def cli(mesh, *args: str, key: str = ADMIN_KEY, target: str | None = None) -> int:
    """The CLI in-process against the plaintext gateway with `key`."""
    return run(["--target", target or mesh.plain, "--api-key", key, "--client-id", CLIENT_ID, *args])


def model_of(mesh, name: str) -> rpb.RegisteredModel:
    """The model as the registry has it (asked directly, over mTLS)."""
    return mesh.client.stub.GetModel(rpb.GetModelRequest(name=name), timeout=30)


def json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def failed(capsys, code: str) -> str:
    """The stderr of a failed command, checked to start with the status."""
    err = capsys.readouterr().err
    assert err.startswith(f"error: {code}: "), err
    assert "Traceback" not in err
    return err


def script(*args: str, env: dict[str, str], stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """The installed console script as a user runs it, in `env` alone."""
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env, stdin=stdin
    )


def typed_at_a_terminal(answer: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The console script with a terminal (a pseudo-terminal) as stdin, on which `answer` is typed."""
    controller, terminal = os.openpty()
    try:
        os.write(controller, f"{answer}\n".encode())
        return script(*args, env=env, stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without any modelgrid setting, with its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELGRID_") and k != "XDG_CONFIG_HOME"}
    return {**env, "HOME": str(home), "TTY_COMPATIBLE": "0", **extra}


# -- canary ---------------------------------------------------------------------------------------------------


def _versions_answering(mesh, capsys, calls: int) -> set[int]:
    versions = set()
    for _ in range(calls):
        assert cli(mesh, "predict", f"{mesh.name}@production", "--input", str(mesh.x), "--json") == 0
        versions.add(json_out(capsys)["version"])
    return versions


def _until_answered_by(mesh, capsys, version: int, timeout: float = 15) -> None:
    """Until a production call answers from `version` (the gateways follow the registry's events), then 5 more."""
    deadline = time.monotonic() + timeout
    while _versions_answering(mesh, capsys, 1) != {version}:
        assert time.monotonic() < deadline, f"production calls never went to version {version}"
        time.sleep(0.2)
    assert _versions_answering(mesh, capsys, 5) == {version}


def test_canary_set_sends_production_calls_to_the_canary_and_rollback_brings_them_back(mesh, capsys):
    assert cli(mesh, "canary", "show", mesh.name, "--json") == 0
    assert json_out(capsys) == {
        "model": mesh.name,
        "weight": 0.0,
        "stable": {"alias": "production", "version": 1},
        "canary": {"alias": "canary", "version": 2},
    }
    assert _versions_answering(mesh, capsys, 3) == {1}

    assert cli(mesh, "canary", "set", mesh.name, "1") == 0
    out = capsys.readouterr().out
    assert "0 -> 1 (100% of" in out and "canary  canary -> 2" in out
    _until_answered_by(mesh, capsys, 2)

    assert cli(mesh, "canary", "rollback", mesh.name, "--json") == 0
    assert json_out(capsys)["weight"] == 0.0
    _until_answered_by(mesh, capsys, 1)
    assert model_of(mesh, mesh.name).tags["modelgrid.canary-weight"] == "0"


def test_canary_refusals(mesh, unique, capsys):
    assert cli(mesh, "canary", "set", "no-such-model", "0.5") == 1
    err = failed(capsys, "NOT_FOUND")
    assert "hint: `modelgrid models list` shows the registered models" in err

    assert cli(mesh, "canary", "set", mesh.name, "1.5") == 2
    assert "invalid weight '1.5'" in capsys.readouterr().err

    lonely = unique("no-canary")
    assert cli(mesh, "models", "create", lonely) == 0
    capsys.readouterr()
    assert cli(mesh, "canary", "set", lonely, "0.2") == 1
    assert f"{lonely} has no alias 'canary'" in capsys.readouterr().err
    assert "modelgrid.canary-weight" not in model_of(mesh, lonely).tags  # nothing was set

    reader = _create_key(mesh, capsys, "canary-reader", "read")
    assert cli(mesh, "canary", "set", mesh.name, "0.5", key=reader["secret"]) == 1
    assert "hint: the API key lacks the scope" in failed(capsys, "PERMISSION_DENIED")


# -- API keys -------------------------------------------------------------------------------------------------


def _create_key(mesh, capsys, name: str, *scopes: str) -> dict:
    scope_args = [arg for scope in scopes for arg in ("--scope", scope)]
    assert cli(mesh, "keys", "create", "--name", name, *scope_args, "--json") == 0
    return json_out(capsys)


def test_keys_create_list_revoke_and_a_revoked_key_is_refused(mesh, capsys):
    assert cli(mesh, "keys", "create", "--name", "ci-predictor", "--scope", "PREDICT", "--scope", "read") == 0
    made = capsys.readouterr()
    [secret] = [line.removeprefix("secret: ") for line in made.out.splitlines() if line.startswith("secret: ")]
    assert "READ, PREDICT" in made.out and "shown only now" in made.err

    assert cli(mesh, "models", "list", "--json", key=secret) == 0
    assert mesh.name in [model["name"] for model in json_out(capsys)["models"]]
    assert cli(mesh, "models", "list", target=mesh.secure, key=secret) == 1  # plaintext to a TLS port
    failed(capsys, "UNAVAILABLE")
    assert run(["--target", mesh.secure, "--ca", str(mesh.ca), "--api-key", secret, "models", "list"]) == 0
    capsys.readouterr()  # the keys live in Redis: the other gateway takes it too

    assert cli(mesh, "keys", "list") == 0
    listed = capsys.readouterr().out
    key_id = secret.split(".")[0]
    assert key_id in listed and "ci-predictor" in listed and secret not in listed

    assert cli(mesh, "keys", "revoke", key_id) == 0
    assert capsys.readouterr().out == f"revoked key {key_id} (ci-predictor)\n"
    assert cli(mesh, "models", "list", key=secret) == 1
    assert "hint: the gateway requires a valid API key" in failed(capsys, "UNAUTHENTICATED")

    assert cli(mesh, "keys", "list", "--json") == 0
    assert key_id not in [key["id"] for key in json_out(capsys).get("keys", [])]
    assert cli(mesh, "keys", "list", "--all", "--json") == 0
    [revoked] = [key for key in json_out(capsys)["keys"] if key["id"] == key_id]
    assert revoked["revoked"] is True and "secret" not in revoked


def test_keys_refusals(mesh, capsys):
    assert cli(mesh, "keys", "revoke", "no-such-key") == 1
    assert "hint: `modelgrid keys list` shows the key ids" in failed(capsys, "NOT_FOUND")
    assert cli(mesh, "keys", "create", "--name", "slow", "--scope", "read", "--rate-limit", "1e-300") == 1
    assert "rate_limit" in failed(capsys, "INVALID_ARGUMENT")
    reader = _create_key(mesh, capsys, "reader", "read")
    assert cli(mesh, "keys", "list", key=reader["secret"]) == 1
    assert "hint: only an ADMIN key manages keys" in failed(capsys, "PERMISSION_DENIED")
    assert cli(mesh, "keys", "list", key="nope.nope") == 1
    assert "nope.nope" not in failed(capsys, "UNAUTHENTICATED")


# -- models delete and update, tags ---------------------------------------------------------------------------


def test_models_update_and_delete(mesh, unique, tmp_path, capsys):
    name = unique("doomed")
    (tmp_path / "artifact.bin").write_bytes(b"some bytes")
    assert cli(mesh, "push", name, str(tmp_path / "artifact.bin"), "--alias", "staging") == 0
    assert cli(mesh, "models", "update", name, "--description", "to be deleted") == 0
    assert capsys.readouterr().out.endswith(f"updated model {name}\n")
    assert model_of(mesh, name).description == "to be deleted"

    assert cli(mesh, "models", "delete", name) == 2  # pytest's stdin is no terminal: no one to ask
    assert "add --yes to confirm" in capsys.readouterr().err
    env = clean_env(tmp_path, MODELGRID_TARGET=mesh.plain, MODELGRID_API_KEY=ADMIN_KEY)
    result = script("models", "delete", name, env=env)  # nor is /dev/null
    assert result.returncode == 2 and "add --yes to confirm" in result.stderr

    assert cli(mesh, "models", "delete", name, "--yes") == 1  # an alias still points at version 1
    assert "hint: remove its aliases first (modelgrid alias rm) or add --force" in failed(capsys, "FAILED_PRECONDITION")
    assert dict(model_of(mesh, name).aliases) == {"staging": 1}

    assert typed_at_a_terminal("not-the-name", "models", "delete", name, "--force", env=env).returncode == 1
    assert model_of(mesh, name).name == name  # a wrong answer deletes nothing
    result = typed_at_a_terminal(name, "models", "delete", name, "--force", env=env)
    assert result.returncode == 0, result.stderr
    assert "type its name to confirm" in result.stderr and "aliases: staging=1" in result.stderr
    assert result.stdout == f"deleted model {name} (1 version(s))\n"
    assert cli(mesh, "models", "show", name) == 1
    failed(capsys, "NOT_FOUND")

    assert cli(mesh, "models", "delete", name, "--yes") == 1
    assert "hint: `modelgrid models list`" in failed(capsys, "NOT_FOUND")
    assert cli(mesh, "models", "update", name, "--description", "x") == 1
    failed(capsys, "NOT_FOUND")


def test_tags_on_a_model_and_on_a_version(mesh, unique, tmp_path, capsys):
    name = unique("tagged")
    (tmp_path / "artifact.bin").write_bytes(b"tagged bytes")
    assert cli(mesh, "push", name, str(tmp_path / "artifact.bin")) == 0
    capsys.readouterr()

    assert cli(mesh, "tags", "set", name, "team=vision", "tier=gold", "note=a=b") == 0
    assert capsys.readouterr().out == f"{name} tags: note=a=b, team=vision, tier=gold\n"
    assert cli(mesh, "tags", "rm", name, "tier", "note", "absent") == 0
    assert capsys.readouterr().out == f"{name} tags: team=vision\n"
    assert cli(mesh, "models", "list", "--tag", "team=vision", "--json") == 0
    assert name in [model["name"] for model in json_out(capsys)["models"]]

    assert cli(mesh, "tags", "set", name, "stage=candidate", "--version", "1", "--json") == 0
    assert json_out(capsys)["tags"] == {"stage": "candidate"}
    assert cli(mesh, "tags", "rm", name, "stage", "--version", "1") == 0
    assert capsys.readouterr().out == f"{name}:1 tags: none\n"
    assert dict(model_of(mesh, name).tags) == {"team": "vision"}  # the version's tags are its own

    assert cli(mesh, "tags", "set", name, "modelgrid.canary-weight=1") == 2  # routing goes through `canary set`
    assert "modelgrid canary set" in capsys.readouterr().err
    assert cli(mesh, "tags", "set", name, "novalue") == 2
    assert "invalid pair 'novalue'" in capsys.readouterr().err
    assert cli(mesh, "tags", "set", "no-such-model", "k=v") == 1
    failed(capsys, "NOT_FOUND")
    assert cli(mesh, "tags", "set", name, "k=v", "--version", "99") == 1
    failed(capsys, "NOT_FOUND")


# -- TLS and profiles -----------------------------------------------------------------------------------------


def test_tls_to_a_gateway_with_a_certificate(mesh, tmp_path, capsys):
    secure = ["--target", mesh.secure, "--api-key", ADMIN_KEY]
    assert run([*secure, "--ca", str(mesh.ca), "models", "show", mesh.name, "--json"]) == 0
    assert json_out(capsys)["name"] == mesh.name

    assert run([*secure, "--tls", "models", "list"]) == 1  # the system's roots do not know this CA
    err = failed(capsys, "UNAVAILABLE")
    assert "--ca FILE when a private CA signed it" in err
    assert run(["--target", mesh.plain, "--api-key", ADMIN_KEY, "--ca", str(mesh.ca), "models", "list"]) == 1
    failed(capsys, "UNAVAILABLE")  # TLS to a plaintext port

    (tmp_path / "not-a-ca.pem").write_text("hello")
    assert run([*secure, "--ca", str(tmp_path / "not-a-ca.pem"), "models", "list"]) == 1
    assert "holds no PEM certificate" in capsys.readouterr().err
    assert run([*secure, "--ca", str(mesh.ca), "--tls-dir", str(tmp_path), "models", "list"]) == 2


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_profiles_flag_beats_environment_beats_profile(mesh, tmp_path):
    home = tmp_path / "home"
    dead = f"127.0.0.1:{free_port()}"
    _write_private(home / "keys" / "admin.key", ADMIN_KEY + "\n")
    config = _write_private(
        home / ".config" / "modelgrid" / "config.toml",
        f"""
[profiles.default]
target = "{mesh.plain}"
api_key_file = "../../keys/admin.key"

[profiles.secure]
target = "{mesh.secure}"
ca = "{mesh.ca}"
api_key = "{ADMIN_KEY}"
timeout = 20

[profiles.dead]
target = "{dead}"
api_key = "{ADMIN_KEY}"
""",
    )
    env = clean_env(home)
    listing = ["models", "list", "--json"]

    def names(result: subprocess.CompletedProcess) -> list[str]:
        assert result.returncode == 0, result.stderr
        return [model["name"] for model in json.loads(result.stdout)["models"]]

    assert mesh.name in names(script(*listing, env=env))  # ~/.config/modelgrid/config.toml, profile default
    assert mesh.name in names(script("--profile", "secure", *listing, env=env))  # TLS with the profile's CA
    result = script("--profile", "dead", *listing, env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: UNAVAILABLE: ") and dead in result.stderr

    assert mesh.name in names(script("--profile", "secure", *listing, env={**env, "MODELGRID_PROFILE": "dead"}))
    assert mesh.name in names(script("--profile", "dead", *listing, env={**env, "MODELGRID_TARGET": mesh.plain}))
    assert mesh.name in names(script("--target", mesh.plain, *listing, env={**env, "MODELGRID_TARGET": dead}))
    assert script(*listing, env={**env, "MODELGRID_PROFILE": "dead"}).returncode == 1

    moved = _write_private(tmp_path / "elsewhere.toml", f'[profiles.default]\ntarget = "{dead}"\n')
    result = script(*listing, env={**env, "MODELGRID_CONFIG": str(moved), "MODELGRID_API_KEY": ADMIN_KEY})
    assert result.returncode == 1 and dead in result.stderr  # $MODELGRID_CONFIG instead of ~/.config
    assert mesh.name in names(script("--config", str(config), *listing, env={**env, "MODELGRID_CONFIG": str(moved)}))

    result = script("--profile", "staging", *listing, env=env)
    assert (
        result.returncode == 2 and "no profile 'staging'" in result.stderr and "dead, default, secure" in result.stderr
    )


def test_a_config_file_with_a_key_others_can_read_is_refused(mesh, tmp_path):
    config = _write_private(
        tmp_path / "config.toml", f'[profiles.default]\ntarget = "{mesh.plain}"\napi_key = "{ADMIN_KEY}"\n'
    )
    config.chmod(0o644)
    env = clean_env(tmp_path, MODELGRID_CONFIG=str(config))
    result = script("models", "list", env=env)
    assert result.returncode == 2
    assert f"run `chmod 600 {config}`" in result.stderr and ADMIN_KEY not in result.stderr
    assert result.stdout == ""
    config.chmod(0o600)
    assert script("models", "list", env=env).returncode == 0
