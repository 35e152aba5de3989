"""Real Consul and Redis start on free loopback ports, answer, keep data across a restart, and stop cleanly."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kit.localinfra import ConsulAgent, RedisServer

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str) -> object:
    with _NO_PROXY.open(url, timeout=5) as response:
        return json.load(response)


def _redis_command(port: int, *args: str) -> bytes:
    """Send one command as a RESP array and return the first reply line."""
    request = f"*{len(args)}\r\n".encode() + b"".join(f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        reply = sock.recv(4096)
    first, _, rest = reply.partition(b"\r\n")
    if first.startswith(b"$") and first != b"$-1":
        return rest.partition(b"\r\n")[0]
    return first


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def consul(tmp_path: Path) -> Iterator[ConsulAgent]:
    with ConsulAgent(tmp_path / "consul") as agent:
        yield agent


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_consul_dev_agent_has_a_leader_and_runs_1_8_7(consul: ConsulAgent) -> None:
    leader = _get_json(f"{consul.http_url}/v1/status/leader")
    assert isinstance(leader, str) and leader.startswith("127.0.0.1:")

    agent_self = _get_json(f"{consul.http_url}/v1/agent/self")
    assert isinstance(agent_self, dict)
    assert agent_self["Config"]["Version"] == "1.8.7"
    assert consul.http_url == f"http://{consul.http_addr}"


def test_redis_answers_ping_and_keeps_data_across_restart(redis: RedisServer) -> None:
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert _redis_command(redis.port, "PING") == b"+PONG"
    assert _redis_command(redis.port, "SET", "modelgrid:test", "survives") == b"+OK"
    pid_before = redis.pid

    redis.restart()

    assert redis.pid != pid_before
    assert pid_before is not None and not _pid_exists(pid_before)
    assert _redis_command(redis.port, "GET", "modelgrid:test") == b"survives"


def test_every_process_is_gone_after_stop(tmp_path: Path) -> None:
    consul = ConsulAgent(tmp_path / "consul")
    redis = RedisServer(tmp_path / "redis")
    consul.start()
    redis.start()
    pids = [consul.pid, redis.pid]
    assert all(pid is not None and _pid_exists(pid) for pid in pids)

    redis.stop()
    consul.stop()

    assert consul.pid is None and redis.pid is None
    assert not any(_pid_exists(pid) for pid in pids if pid is not None)


def test_redis_kill_loses_the_process_immediately(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    pid = redis.pid
    assert pid is not None

    redis.kill()

    assert redis.pid is None and not _pid_exists(pid)
