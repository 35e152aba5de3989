"""Connection settings of the command line: a flag, else an environment variable, else the profile of a config
file, else a built-in default, setting by setting, so that one flag or variable still overrides a profile.

    # ~/.config/modelgrid/config.toml (elsewhere: $MODELGRID_CONFIG or --config)
    [profiles.default]                # used when no profile is named (--profile, $MODELGRID_PROFILE)
    target = "127.0.0.1:8080"

    [profiles.prod]
    target = "gateway.example.com:8080"
    tls = true                        # the system's roots; ca = "prod-ca.pem" for a private CA
    api_key_file = "prod.key"         # or api_key = "..."
    timeout = 10

Paths in a profile (ca, tls_dir, api_key_file) are relative to the config file's directory. A config file that
holds an api_key, and an api_key_file, must not be readable by group or others: like ssh with its keys, the CLI
refuses them and says which chmod fixes it.
"""

import getpass
import logging
import math
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 30.0
CONFIG_ENV, PROFILE_ENV = "MODELGRID_CONFIG", "MODELGRID_PROFILE"
DEFAULT_PROFILE = "default"


class ConfigError(Exception):
    """A config file, profile or setting cannot be used; the message says which, and how to fix it."""


def default_client_id() -> str:
    """ "cli:<user>@<hostname>"."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER, e.g. in some containers
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _text(value: str) -> str:
    return value


def _switch(value: str) -> bool:
    """1/true/yes/on or 0/false/no/off, as environment variables usually say it."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _seconds(value: str | float) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("expected a number of seconds > 0")
    return seconds


@dataclass(frozen=True)
class Setting:
    """One connection setting: its flag's dest (also its profile key), its environment variable, its default."""

    name: str
    env: str
    default: Callable[[], object]
    parse: Callable[[str], object] = _text
    """Reads the setting from text (an environment variable, a TOML string); raises ValueError."""
    path: bool = False
    """A file or directory: a profile's relative path is relative to the config file."""


SETTINGS: tuple[Setting, ...] = (
    Setting("target", "MODELGRID_TARGET", lambda: DEFAULT_TARGET),
    Setting("predictor", "MODELGRID_PREDICTOR_TARGET", lambda: None),
    Setting("trainer", "MODELGRID_TRAINER_TARGET", lambda: None),
    Setting("api_key", "MODELGRID_API_KEY", lambda: ""),
    Setting("tls", "MODELGRID_TLS", lambda: None, _switch),  # None: TLS when a CA is given
    Setting("ca", "MODELGRID_CA", lambda: None, path=True),
    Setting("tls_dir", "MODELGRID_TLS_DIR", lambda: None, path=True),
    Setting("timeout", "MODELGRID_TIMEOUT", lambda: DEFAULT_TIMEOUT_S, _seconds),
    Setting("client_id", "MODELGRID_CLIENT_ID", default_client_id),
)
_BY_NAME = {setting.name: setting for setting in SETTINGS}
PROFILE_KEYS = (*(setting.name for setting in SETTINGS), "api_key_file")


def resolve(
    flags: Mapping[str, object], environ: Mapping[str, str], profile: Mapping[str, object]
) -> dict[str, object]:
    """Every setting: the flag (not None), else the environment variable (not empty), else the profile's value,
    else the default."""
    values: dict[str, object] = {}
    for setting in SETTINGS:
        if flags.get(setting.name) is not None:
            values[setting.name] = flags[setting.name]
        elif environ.get(setting.env):
            try:
                values[setting.name] = setting.parse(environ[setting.env])
            except ValueError as exc:
                raise ConfigError(f"{setting.env}: {exc}") from None
        elif setting.name in profile:
            values[setting.name] = profile[setting.name]
        else:
            values[setting.name] = setting.default()
    return values


def config_path(flag: str | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """(the config file, whether it was named): --config, else $MODELGRID_CONFIG, else
    $XDG_CONFIG_HOME/modelgrid/config.toml with ~/.config as the XDG default."""
    named = flag or environ.get(CONFIG_ENV)
    if named:
        return Path(named).expanduser(), True
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "modelgrid" / "config.toml", False


def _private(path: Path, what: str) -> None:
    """Refuses a file holding an API key that group or others may read: the key would be theirs too."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"{path} holds {what} but is readable by group or others (mode {mode & 0o777:o}): "
            f"run `chmod 600 {path}` and try again"
        )


def load_profile(path: Path, named: bool, profile: str | None) -> dict[str, object]:
    """The settings of `profile` (None: the `default` profile, if the file has one) in the config file at `path`,
    checked and with paths made absolute. A missing file is no error unless it or a profile was named."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if named or profile:
            raise ConfigError(f"no config file at {path} (--config, ${CONFIG_ENV})") from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    profiles = data.get("profiles", {})
    unknown = sorted(set(data) - {"profiles"})
    if unknown or not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise ConfigError(f"{path}: expected only [profiles.NAME] tables" + (f", found {unknown}" if unknown else ""))
    if any("api_key" in table for table in profiles.values()):
        _private(path, "an api_key")
    if profile is None:
        if DEFAULT_PROFILE not in profiles:
            return {}
        profile = DEFAULT_PROFILE
    if profile not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"no profile {profile!r} in {path} (profiles: {known})")
    return _checked(profiles[profile], path, profile)


def _checked(table: dict[str, object], path: Path, name: str) -> dict[str, object]:
    """A profile's table as settings: known keys only, of the right type, paths absolute, api_key_file read."""
    where = f"{path}, profile {name}"
    unknown = sorted(set(table) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown} (known: {', '.join(PROFILE_KEYS)})")
    if "api_key" in table and "api_key_file" in table:
        raise ConfigError(f"{where}: give api_key or api_key_file, not both")
    values: dict[str, object] = {}
    for key, value in table.items():
        if key == "api_key_file" or (key in _BY_NAME and _BY_NAME[key].path):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: {key} must be a path")
            value = str(path.parent / Path(value).expanduser())
        if key == "api_key_file":
            values["api_key"] = _read_key_file(Path(value), where)
        elif key == "tls":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: tls must be true or false")
            values[key] = value
        elif key == "timeout":
            try:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError
                values[key] = _seconds(value)
            except ValueError:
                raise ConfigError(f"{where}: timeout must be a number of seconds > 0") from None
        elif not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a non-empty string")  # never echoes the value: a key
        else:
            values[key] = value
    return values


def _read_key_file(path: Path, where: str) -> str:
    try:
        _private(path, "an API key")
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read api_key_file {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"{where}: api_key_file {path} is empty")
    return key
