"""Real Consul and Redis start on free loopback ports, answer, keep data across a restart, and stop cleanly."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from services.kit.localinfra import ConsulAgent, RedisServer

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, token: str = "") -> object:
    request = urllib.request.Request(url, headers={"X-Consul-Token": token} if token else {})
    with _NO_PROXY.open(request, timeout=5) as response:
        return json.load(response)


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

    agent_self = _get_json(f"{consul.http_url}/v1/agent/self", token=consul.master_token)  # ACLs: default deny
    assert isinstance(agent_self, dict)
    assert agent_self["Config"]["Version"] == "1.8.7"
    assert consul.http_url == f"http://{consul.http_addr}"


def test_redis_answers_ping_and_keeps_data_across_restart(redis: RedisServer) -> None:
    assert redis.url == f"redis://:{redis.password}@127.0.0.1:{redis.port}/0"
    with Redis.from_url(redis.url, socket_timeout=5) as client:
        assert client.ping()
        assert client.set("modelgrid:test", "survives")
    pid_before = redis.pid

    redis.restart()

    assert redis.pid != pid_before
    assert pid_before is not None and not _pid_exists(pid_before)
    with Redis.from_url(redis.url, socket_timeout=5) as client:  # the same URL: same port, same password
        assert client.get("modelgrid:test") == b"survives"


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


def test_free_ports_are_picked_below_the_ephemeral_range_and_split_between_test_workers(monkeypatch):
    from services.kit.localinfra import _pick_range, free_ports

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(port < low for port in ports)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    first = _pick_range()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    second = _pick_range()
    assert first and second and not set(first) & set(second)


def test_a_picked_port_is_not_handed_out_again_before_it_is_bound():
    from services.kit.localinfra import free_port

    # Unbound picks from a range of some thousand ports: without the memory of recent picks, 400 of them would
    # repeat one almost surely (the birthday bound), and two services started together would share it.
    picked = [free_port() for _ in range(400)]
    assert len(set(picked)) == len(picked), "a port was handed out twice while none of them was bound"


def test_a_service_started_by_a_test_picks_its_own_ports_from_the_kernel(monkeypatch, tmp_path):
    from services.kit.localinfra import KERNEL_PORTS_ENV, _pick_range
    from services.kit.processes import ServiceProcess

    process = ServiceProcess("services.registry", "MODELGRID_REGISTRY_", {}, tmp_path / "registry.log")
    assert process.env[KERNEL_PORTS_ENV] == "1"
    monkeypatch.setenv(KERNEL_PORTS_ENV, "1")
    assert not _pick_range()  # the test process's range is its own
