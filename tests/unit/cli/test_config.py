"""Where the command line's connection settings come from: flag > environment > profile > default, the config
file's profiles, and the refusal of API keys that others could read."""

import argparse
from pathlib import Path

import pytest

from services.cli import config
from services.cli.main import build_parser, run, settings_of
from services.cli.registry_commands import UsageError
from services.cli.tag_commands import CANARY_ALIAS, CANARY_WEIGHT_TAG, STABLE_ALIAS
from services.gateway.settings import GatewaySettings


def write_config(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def parsed(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    """The settings `modelgrid ARGV` would connect with, in the environment `environ` (no call is made)."""
    args = build_parser().parse_args(argv)
    settings_of(args, environ)
    return args


PROFILES = """
[profiles.default]
target = "default-profile:1"
timeout = 5

[profiles.prod]
target = "prod-profile:1"
predictor = "prod-predictor:1"
tls = true
"""


@pytest.mark.parametrize(
    ("flag", "env", "profile", "expected"),
    [
        ("flag:1", "env:1", "prod", "flag:1"),
        (None, "env:1", "prod", "env:1"),
        (None, None, "prod", "prod-profile:1"),
        (None, None, None, "default-profile:1"),  # no profile named: the one named default
    ],
)
def test_flag_beats_environment_beats_profile_beats_default(tmp_path, flag, env, profile, expected):
    path = write_config(tmp_path, PROFILES)
    environ = {config.CONFIG_ENV: str(path)}
    if env:
        environ["MODELGRID_TARGET"] = env
    argv = [*(["--profile", profile] if profile else []), "models", "list", *(["--target", flag] if flag else [])]
    assert parsed(argv, environ).target == expected


def test_each_setting_is_resolved_on_its_own(tmp_path):
    path = write_config(tmp_path, PROFILES)
    environ = {config.PROFILE_ENV: "prod", config.CONFIG_ENV: str(path), "MODELGRID_TIMEOUT": "7"}
    args = parsed(["models", "list"], environ)
    assert (args.target, args.predictor, args.tls, args.timeout) == ("prod-profile:1", "prod-predictor:1", True, 7.0)
    args = parsed(["--no-tls", "--predictor", "flag:2", "models", "list"], environ)
    assert (args.predictor, args.tls) == ("flag:2", False)


def test_built_in_defaults_without_any_config_file(tmp_path):
    environ = {"HOME": str(tmp_path)}  # ~/.config/modelgrid/config.toml does not exist: no error
    args = parsed(["models", "list"], environ)
    assert (args.target, args.timeout, args.tls, args.api_key) == (config.DEFAULT_TARGET, 30.0, False, "")
    assert args.client_id.startswith("cli:")
    assert config.config_path(None, environ) == (tmp_path / ".config" / "modelgrid" / "config.toml", False)
    xdg = {**environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert config.config_path(None, xdg) == (tmp_path / "xdg" / "modelgrid" / "config.toml", False)
    assert config.config_path("--given.toml", xdg) == (Path("--given.toml"), True)


def test_home_config_file_is_read_when_nothing_names_one(tmp_path):
    (tmp_path / ".config" / "modelgrid").mkdir(parents=True)
    write_config(tmp_path / ".config" / "modelgrid", PROFILES)
    assert parsed(["models", "list"], {"HOME": str(tmp_path)}).target == "default-profile:1"


def test_a_named_but_missing_file_or_profile_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="no config file"):
        parsed(["models", "list"], {config.CONFIG_ENV: str(tmp_path / "missing.toml")})
    with pytest.raises(config.ConfigError, match="no config file"):
        parsed(["--profile", "prod", "models", "list"], {"HOME": str(tmp_path)})
    path = write_config(tmp_path, PROFILES)
    with pytest.raises(config.ConfigError, match=r"no profile 'staging' .*profiles: default, prod"):
        parsed(["--profile", "staging", "models", "list"], {config.CONFIG_ENV: str(path)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[profiles.p]\ntargett = "x"', r"unknown setting\(s\) \['targett'\]"),
        ("[profiles.p]\ntls = 1", "tls must be true or false"),
        ('[profiles.p]\ntimeout = "soon"', "timeout must be a number"),
        ("[profiles.p]\ntimeout = 0", "timeout must be a number"),
        ("[profiles.p]\ntarget = 5", "target must be a non-empty string"),
        ('[profile.p]\ntarget = "x"', r"expected only \[profiles.NAME\] tables"),
        ("[profiles.p\n", "not valid TOML"),
    ],
)
def test_bad_profiles_are_refused_with_what_is_wrong(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(config.ConfigError, match=message):
        config.load_profile(path, True, "p")


def test_a_key_in_a_file_others_can_read_is_refused_with_the_chmod_that_fixes_it(tmp_path):
    path = write_config(tmp_path, '[profiles.default]\napi_key = "k1.secret"\n', mode=0o644)
    with pytest.raises(config.ConfigError) as err:
        parsed(["models", "list"], {config.CONFIG_ENV: str(path)})
    assert f"chmod 600 {path}" in str(err.value) and "k1.secret" not in str(err.value)
    path.chmod(0o640)  # group-readable is refused too
    with pytest.raises(config.ConfigError, match="readable by group or others"):
        parsed(["models", "list"], {config.CONFIG_ENV: str(path)})
    path.chmod(0o600)
    assert parsed(["models", "list"], {config.CONFIG_ENV: str(path)}).api_key == "k1.secret"
    assert parsed(["models", "list"], {config.CONFIG_ENV: str(path), "MODELGRID_API_KEY": "k2.env"}).api_key == "k2.env"


def test_a_file_without_keys_may_be_readable(tmp_path):
    path = write_config(tmp_path, PROFILES, mode=0o644)
    assert parsed(["models", "list"], {config.CONFIG_ENV: str(path)}).target == "default-profile:1"


def test_api_key_file_and_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "prod.key").write_text("k3.from-file\n")
    (tmp_path / "prod.key").chmod(0o644)
    text = '[profiles.default]\napi_key_file = "prod.key"\nca = "ca.pem"\ntls_dir = "~/mesh-tls"\n'
    path = write_config(tmp_path, text, mode=0o644)  # the key is not in this file: it may be readable
    with pytest.raises(config.ConfigError, match=f"chmod 600 {tmp_path / 'prod.key'}"):
        config.load_profile(path, True, None)
    (tmp_path / "prod.key").chmod(0o600)
    profile = config.load_profile(path, True, None)
    assert profile == {
        "api_key": "k3.from-file",
        "ca": str(tmp_path / "ca.pem"),
        "tls_dir": str(Path("~/mesh-tls").expanduser()),
    }
    both = write_config(tmp_path, '[profiles.p]\napi_key = "a"\napi_key_file = "prod.key"\n')
    with pytest.raises(config.ConfigError, match="not both"):
        config.load_profile(both, True, "p")


def test_environment_values_are_checked():
    with pytest.raises(config.ConfigError, match="MODELGRID_TIMEOUT"):
        config.resolve({}, {"MODELGRID_TIMEOUT": "-1"}, {})
    with pytest.raises(config.ConfigError, match="MODELGRID_TLS"):
        config.resolve({}, {"MODELGRID_TLS": "maybe"}, {})
    assert config.resolve({}, {"MODELGRID_TLS": "yes", "MODELGRID_TARGET": ""}, {})["tls"] is True
    assert config.resolve({}, {"MODELGRID_TARGET": ""}, {})["target"] == config.DEFAULT_TARGET  # empty: unset


def test_a_ca_implies_tls_and_tls_does_not_mix_with_the_mesh_certificates(tmp_path):
    environ = {"HOME": str(tmp_path)}
    assert parsed(["--ca", "ca.pem", "models", "list"], environ).tls is True
    with pytest.raises(UsageError, match="give one"):
        parsed(["--tls", "--tls-dir", str(tmp_path), "models", "list"], environ)
    with pytest.raises(UsageError, match="--no-tls"):
        parsed(["--ca", "ca.pem", "--no-tls", "models", "list"], environ)
    with pytest.raises(UsageError, match="managed on the gateway"):
        parsed(["--tls-dir", str(tmp_path), "keys", "list"], environ)


def test_config_errors_exit_2_before_any_call(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, '[profiles.default]\napi_key = "k1.secret"\n', mode=0o604)
    monkeypatch.setenv(config.CONFIG_ENV, str(path))
    assert run(["models", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "chmod 600" in err and "k1.secret" not in err


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "nan", "inf", "ten"])
def test_a_canary_weight_outside_0_to_1_is_bad_usage(bad, capsys):
    assert run(["canary", "set", "m", bad]) == 2
    assert f"invalid weight {bad!r}: expected a number from 0 to 1" in capsys.readouterr().err


def test_canary_names_agree_with_the_gateways_defaults():
    fields = GatewaySettings.model_fields
    assert fields["canary_weight_tag"].default == CANARY_WEIGHT_TAG
    assert (fields["stable_alias"].default, fields["canary_alias"].default) == (STABLE_ALIAS, CANARY_ALIAS)


def test_keys_create_needs_a_known_scope_and_a_name(capsys):
    assert run(["keys", "create", "--name", "x", "--scope", "root"]) == 2
    assert "invalid scope 'root'" in capsys.readouterr().err
    assert run(["keys", "create", "--scope", "read"]) == 2
    assert "--name" in capsys.readouterr().err
