"""Redis passwords: made at setup, kept in files of mode 0600, carried in client URLs and masked wherever shown."""

import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from services.kit.private_files import read_private_file, write_private_file

PASSWORD_BYTES = 32
"""Random bytes in a generated password (43 URL-safe characters)."""
MASK = "***"
"""What a password is shown as."""


class RedisPasswordError(RuntimeError):
    """A Redis password file is missing, unreadable or holds no usable password; the message names the file, never
    its content. Not a ValueError on purpose: pydantic would wrap one into a ValidationError that prints the
    settings' input, redis_url included."""


def generate_password() -> str:
    """A new random password: URL-safe characters only, so it needs no quoting in a URL or a shell."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def read_password_file(path: Path | str) -> str:
    """The password in `path`: its content without surrounding whitespace (a trailing newline, as `echo` writes).
    Warns if other users may read the file."""
    path = Path(path)
    password = read_private_file(path, "Redis password", RedisPasswordError)
    if not password:
        raise RedisPasswordError(f"the Redis password file {path} is empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in password):
        raise RedisPasswordError(f"the Redis password in {path} holds control characters (one line of text, please)")
    return password


def write_password_file(path: Path | str, password: str) -> None:
    """Write `password` to `path` with mode 0600 (kit.private_files)."""
    write_private_file(Path(path), password + "\n")


def ensure_password_file(path: Path | str) -> tuple[str, bool]:
    """(password, made): the password in `path`, or a new one written there (mode 0600) if the file is missing."""
    path = Path(path)
    if path.exists():
        return read_password_file(path), False
    password = generate_password()
    write_password_file(path, password)
    return password, True


def url_with_password(url: str, password: str) -> str:
    """`url` with `password` in place of any password it has (percent-encoded; a user name in it is kept)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = quote(parts.username, safe="") if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def redacted_url(url: str) -> str:
    """`url` with its password, if any, shown as ***: what logs, errors and status lines may print."""
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # not a URL we can take apart: show nothing of what may be credentials
        return url.rpartition("@")[2] if "@" in url else url
    if not has_password:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def requirepass_directive(password: str) -> str:
    """The redis.conf line that makes Redis require `password` (quoted as redis.conf reads quoted strings)."""
    escaped = password.replace("\\", "\\\\").replace('"', '\\"')
    return f'requirepass "{escaped}"\n'


def write_redis_auth_config(path: Path | str, password: str) -> None:
    """A redis.conf (mode 0600) that only sets the password: redis-server takes it as its first argument, so the
    password is on no command line (`ps`) and in no log of the command."""
    write_private_file(Path(path), requirepass_directive(password))
