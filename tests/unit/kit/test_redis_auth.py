"""Redis requires a password: a real RedisServer refuses clients without it, keeps it in its state dir (mode 0600)
across stop and start, `.url` and redis_password_file carry it, and nothing shows it in the clear."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError

from services.kit.localinfra import REDIS_PASSWORD_FILE, RedisServer, free_ports, main, redis_ping
from services.kit.redis_auth import (
    RedisPasswordError,
    read_password_file,
    redacted_url,
    url_with_password,
    write_password_file,
)
from services.kit.redis_client import create_redis
from services.kit.settings import ServiceSettings


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_client_without_the_password_is_refused_and_one_with_the_url_is_served(redis: RedisServer) -> None:
    with Redis(host="127.0.0.1", port=redis.port, socket_timeout=5) as anonymous:
        with pytest.raises(AuthenticationError):  # NOAUTH Authentication required
            anonymous.ping()
        with pytest.raises(AuthenticationError):
            anonymous.set("modelgrid:test", "written without a password")
    with Redis(host="127.0.0.1", port=redis.port, password="not-" + redis.password, socket_timeout=5) as wrong:
        with pytest.raises(AuthenticationError):  # WRONGPASS
            wrong.ping()
    with Redis.from_url(redis.url, socket_timeout=5) as client:
        assert client.ping()
        assert client.set("modelgrid:test", "with the password")
    assert not redis_ping("127.0.0.1", redis.port)
    assert not redis_ping("127.0.0.1", redis.port, password="not-" + redis.password)
    assert redis_ping("127.0.0.1", redis.port, password=redis.password)


def test_the_password_is_kept_0600_in_the_state_dir_and_survives_stop_and_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "redis"
    first = RedisServer(state_dir)
    first.start()
    try:
        password_file = state_dir / REDIS_PASSWORD_FILE
        assert first.password_file == password_file
        assert _mode(password_file) == 0o600
        assert read_password_file(password_file) == first.password
        assert len(first.password) >= 40  # secrets.token_urlsafe(32)
        assert all(
            _mode(path) == 0o600
            for path in state_dir.iterdir()
            if path.is_file() and first.password in path.read_text("latin-1")
        )
        # Not on the command line (`ps`) nor in Redis's log: it reaches redis-server in a 0600 config file.
        assert first.password.encode() not in Path(f"/proc/{first.pid}/cmdline").read_bytes()
        with Redis.from_url(first.url, socket_timeout=5) as client:
            client.set("modelgrid:test", "kept")
        first.restart()  # as the fault tests do: the same password
        with Redis.from_url(first.url, socket_timeout=5) as client:
            assert client.get("modelgrid:test") == b"kept"
    finally:
        first.stop()
    assert first.password not in first.log_path.read_text()

    second = RedisServer(state_dir, port=first.port)  # a later `make up` on the same state dir
    assert second.password == first.password and second.url == first.url
    with second:
        with Redis.from_url(first.url, socket_timeout=5) as client:
            assert client.get("modelgrid:test") == b"kept"
    assert RedisServer(tmp_path / "other").password != first.password  # a new state dir: a new password


def test_a_given_password_is_used_quoted_in_the_url_and_kept(tmp_path: Path) -> None:
    given = 'a "given" pass/word@with:odd\\chars'
    with RedisServer(tmp_path / "redis", password=given) as server:
        assert "@127.0.0.1:" in server.url and given not in server.url  # percent-encoded
        with Redis.from_url(server.url, socket_timeout=5) as client:
            assert client.ping()
        assert redis_ping("127.0.0.1", server.port, password=given)
        assert read_password_file(server.password_file) == given


def test_the_command_line_keeps_the_password_across_up_down_and_up(tmp_path: Path, capsys) -> None:
    state_dir = tmp_path / "run"
    consul_port, redis_port = free_ports(2)
    arguments = ["--state-dir", str(state_dir), "--consul-port", str(consul_port), "--redis-port", str(redis_port)]
    try:
        assert main(["up", *arguments]) == 0
        password_file = state_dir / REDIS_PASSWORD_FILE
        assert _mode(password_file) == 0o600
        password = read_password_file(password_file)
        url = url_with_password(f"redis://127.0.0.1:{redis_port}/0", password)
        with Redis.from_url(url, socket_timeout=5) as client:
            client.set("modelgrid:test", "across down and up")
        assert main(["status", "--state-dir", str(state_dir)]) == 0
        assert main(["up", *arguments]) == 0  # already running: answers with the kept password
        assert main(["down", "--state-dir", str(state_dir)]) == 0
        assert main(["up", *arguments]) == 0
        assert read_password_file(password_file) == password
        with Redis.from_url(url, socket_timeout=5) as client:
            assert client.get("modelgrid:test") == b"across down and up"
    finally:
        main(["down", "--state-dir", str(state_dir)])
    assert password not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://default:s3cret@198.18.0.1:6379/2", "redis://default:***@198.18.0.1:6379/2"),
        ("rediss://:p%40ss%2Fword@host/0?ssl_cert_reqs=required", "rediss://:***@host/0?ssl_cert_reqs=required"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
    ],
)
def test_redacted_url_masks_the_password_only(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_url_with_password_replaces_any_password_and_keeps_the_user() -> None:
    assert url_with_password("redis://redis:6379/0", "pw") == "redis://:pw@redis:6379/0"
    assert url_with_password("redis://:old@redis:6379/0", "new") == "redis://:new@redis:6379/0"
    assert url_with_password("redis://app:old@redis:6379/1", "a b/@") == "redis://app:a%20b%2F%40@redis:6379/1"


def test_the_password_file_setting_overrides_the_url_and_is_never_shown(redis: RedisServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret" / "redis-password"
    write_password_file(secret, redis.password)
    assert _mode(secret) == 0o600
    settings = ServiceSettings(
        redis_url=f"redis://:stale-password@127.0.0.1:{redis.port}/0", redis_password_file=secret
    )
    assert settings.redis_url == redis.url
    assert redis.password not in repr(settings) and redis.password not in str(settings)

    async def ping() -> bool:
        client = create_redis(settings.redis_url)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(ping())  # the real server takes the file's password


def test_a_missing_or_empty_password_file_is_named_without_the_url(tmp_path: Path) -> None:
    url = "redis://:password-in-the-url@127.0.0.1:6379/0"
    with pytest.raises(RedisPasswordError, match="redis-password") as missing:
        ServiceSettings(redis_url=url, redis_password_file=tmp_path / "redis-password")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RedisPasswordError, match="empty") as empty:
        ServiceSettings(redis_url=url, redis_password_file=tmp_path / "empty")
    for error in (missing, empty):
        assert "password-in-the-url" not in str(error.value)


def test_the_redis_client_logs_its_url_masked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.kit.redis_client")
    client = create_redis("redis://:never-logged@127.0.0.1:1/0")
    asyncio.run(client.aclose())
    assert "redis://:***@127.0.0.1:1/0" in caplog.text
    assert "never-logged" not in caplog.text
