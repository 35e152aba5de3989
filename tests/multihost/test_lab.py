"""The test hosts themselves (hosts.py): a private network between them and nothing beyond, a filesystem of their
own at /var/lib/modelgrid, a Consul cluster that survives a cut link and a dead server, Redis on host a, and a
teardown that leaves nothing. The tests run in file order: the last one on the module's lab kills a host."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from services.kit.localinfra import pid_alive

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

STATE_PATH = "/var/lib/modelgrid"

# A TCP server that answers each connection with "<peer address> said <what it sent>" (also a health check target).
ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, peer = server.accept()
    with conn:
        try:
            conn.sendall(peer[0].encode() + b" said " + conn.recv(1024))
        except OSError:
            pass
"""

# Connects to argv[1]:argv[2] (retrying up to argv[3] seconds), sends "hello", prints the answer; exit 1 if never.
ECHO_CLIENT = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as sock:
            sock.sendall(b"hello")
            print(sock.recv(1024).decode())
            break
    except OSError as error:
        if time.monotonic() > deadline:
            print(error)
            sys.exit(1)
        time.sleep(0.1)
"""


def echo_from(host, address: str, port: int, patience: float = 10.0) -> subprocess.CompletedProcess:
    """Run the echo client on `host` against address:port."""
    return host.run([sys.executable, "-c", ECHO_CLIENT, address, str(port), str(patience)], check=False)


def echo_from_test_process(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=2) as sock:
        sock.sendall(b"hello")
        return sock.recv(1024).decode()


def start_echo_server(host, port: int) -> subprocess.Popen:
    server = host.spawn([sys.executable, "-c", ECHO_SERVER, host.address, str(port)])
    assert echo_from(host, host.address, port).returncode == 0, "the echo server did not come up"
    return server


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(10)


def test_hosts_reach_each_other_and_nothing_else(lab):
    a, b, c = lab.hosts
    server = start_echo_server(c, 7007)
    try:
        answer = echo_from(b, c.address, 7007)
        assert answer.stdout.strip() == f"{b.address} said hello", answer
        # The test process reaches the hosts over the client link, from its own lab address.
        assert echo_from_test_process(c.address, 7007) == f"{lab.client_address} said hello"
    finally:
        stop(server)

    for host in lab.hosts:
        links = host.run(["ip", "-o", "link", "show"]).stdout
        assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == ["lo", "eth0"]
        assert host.run(["ip", "-4", "route", "show"]).stdout.split()[0] == str(lab.subnet)
        assert host.run(["ip", "route", "show", "default"]).stdout.strip() == ""
        # A route lookup (no packet is sent): anything outside the lab subnet is unreachable from a host.
        lookup = host.run(["ip", "route", "get", "203.0.113.1"], check=False)
        assert lookup.returncode != 0 and "unreachable" in lookup.stderr, lookup
        # Loopback is up and the host's own.
        assert host.run(["ip", "-o", "addr", "show", "lo"]).stdout.count("127.0.0.1/8") == 1


def test_each_host_has_its_own_state_path(lab):
    a, b, c = lab.hosts
    name = f"probe-{uuid.uuid4().hex[:8]}"
    path = f"{STATE_PATH}/{name}"
    b.run(["sh", "-c", f"echo written-on-b > {path}"])

    assert b.run(["cat", path]).stdout == "written-on-b\n"
    assert c.run(["test", "-e", path], check=False).returncode == 1
    assert a.run(["test", "-e", path], check=False).returncode == 1
    assert not Path(path).exists()  # the machine itself
    assert (b.state_dir / name).read_text() == "written-on-b\n"  # where the test process finds b's files

    c.run(["sh", "-c", f"echo written-on-c > {path}"])
    assert c.run(["cat", path]).stdout == "written-on-c\n"
    assert b.run(["cat", path]).stdout == "written-on-b\n"

    assert b.run(["mountpoint", "-q", STATE_PATH], check=False).returncode == 0
    assert not os.path.ismount(STATE_PATH)


def test_redis_on_a_serves_every_host_and_keeps_its_aof_on_a(hosts_lib, lab, lab_redis):
    a, b, c = lab.hosts
    key = f"mh:{uuid.uuid4().hex[:8]}"
    assert c.python(f"import redis; print(redis.Redis.from_url('{lab_redis.url}').set('{key}', 'from-c'))") == "True"
    client = redis.Redis.from_url(lab_redis.url, socket_timeout=3)
    try:
        assert client.get(key) == b"from-c"
    finally:
        client.close()

    def aof_has_key() -> bool:
        return any(key.encode() in f.read_bytes() for f in (a.state_dir / "redis").rglob("*.aof"))

    hosts_lib.wait_for(aof_has_key, 5, "the key in a's AOF")
    assert b.run(["test", "-e", f"{STATE_PATH}/redis"], check=False).returncode == 1


def test_consul_cluster_has_one_leader_and_every_host_its_own_agent(hosts_lib, lab, consul_cluster):
    leaders = {consul_cluster.leader(host) for host in lab.hosts}
    assert len(leaders) == 1 and leaders != {""}, leaders
    assert consul_cluster.leader_host() in lab.hosts
    for host in lab.hosts:
        assert consul_cluster.members(host) == {h.name: hosts_lib.MEMBER_ALIVE for h in lab.hosts}
        # A host's services reach their own agent on the host's loopback.
        code = (
            "import json, urllib.request\n"
            f"print(json.load(urllib.request.urlopen('{host.consul_url}/v1/agent/self', timeout=3))"
            "['Config']['NodeName'])"
        )
        assert host.python(code) == host.name
    peers = consul_cluster.get(lab["a"], "/v1/status/peers")
    assert sorted(peers) == sorted(f"{host.address}:8300" for host in lab.hosts)


def register_tcp_service(host, name: str, port: int) -> None:
    """Register `name` at host:port with its local agent, from the host itself (as a service would)."""
    body = {
        "ID": f"{name}-{host.letter}",
        "Name": name,
        "Address": host.address,
        "Port": port,
        "Check": {"TCP": f"{host.address}:{port}", "Interval": "1s", "Timeout": "1s"},
    }
    code = (
        "import json, sys, urllib.request\n"
        f"request = urllib.request.Request('{host.consul_url}/v1/agent/service/register', method='PUT',"
        " data=sys.stdin.read().encode())\n"
        "print(urllib.request.urlopen(request, timeout=3).status)\n"
    )
    result = host.run([sys.executable, "-c", code], input=json.dumps(body))
    assert result.stdout.strip() == "200", result


def test_a_service_registered_on_b_is_healthy_on_a_and_c(hosts_lib, lab, consul_cluster):
    a, b, c = lab.hosts
    name = f"svc-{uuid.uuid4().hex[:6]}"
    server = start_echo_server(b, 7101)
    register_tcp_service(b, name, 7101)
    started = time.monotonic()
    for other in (a, c):
        hosts_lib.wait_for(
            lambda other=other: consul_cluster.healthy(other, name) == [b.address], 20, f"{name} on {other}"
        )
    print(f"\n  {name} healthy on a and c {time.monotonic() - started:.1f}s after its registration on b")

    stop(server)  # its TCP check fails: it leaves the healthy set everywhere
    for other in (a, c):
        hosts_lib.wait_for(lambda other=other: consul_cluster.healthy(other, name) == [], 20, f"{name} critical")


def test_a_cut_host_vanishes_and_comes_back(hosts_lib, lab, consul_cluster):
    a, b, c = lab.hosts
    server = start_echo_server(c, 7102)
    try:
        c.cut()
        assert c.is_cut
        cut_at = time.monotonic()
        failed = echo_from(b, c.address, 7102, patience=2)
        assert failed.returncode == 1, failed  # "No route to host" or a timeout
        with pytest.raises(OSError):
            echo_from_test_process(c.address, 7102)
        hosts_lib.wait_for(lambda: consul_cluster.members(a).get(c.name) == hosts_lib.MEMBER_FAILED, 30, "c failed")
        seen_failed = time.monotonic() - cut_at

        def a_and_b_agree_on_a_leader() -> bool:  # c may have been the leader: a and b elect another one
            leader = consul_cluster.leader(a)
            return leader not in ("", f"{c.address}:8300") and leader == consul_cluster.leader(b)

        hosts_lib.wait_for(a_and_b_agree_on_a_leader, 15, "a leader on a and b")
        # c itself runs on, alone: its interface keeps its address (a pulled cable, not a removed card).
        assert echo_from(c, c.address, 7102).stdout.strip() == f"{c.address} said hello"

        c.restore()
        assert not c.is_cut
        restored_at = time.monotonic()
        assert echo_from(b, c.address, 7102).stdout.strip() == f"{b.address} said hello"
        consul_cluster.wait_ready(timeout=90)  # Serf takes a cut member back on its reconnect round (30 s)
        print(
            f"\n  c seen failed {seen_failed:.1f}s after the cut, "
            f"alive again {time.monotonic() - restored_at:.1f}s after the restore"
        )
    finally:
        c.restore()
        stop(server)


def test_killing_the_leaders_host_keeps_a_leader_and_the_services(hosts_lib, lab, consul_cluster):
    victim = consul_cluster.leader_host()
    survivors = [host for host in lab.hosts if host is not victim]
    name = f"svc-{uuid.uuid4().hex[:6]}"
    server = start_echo_server(survivors[0], 7103)
    register_tcp_service(survivors[0], name, 7103)
    for host in survivors:
        hosts_lib.wait_for(lambda host=host: consul_cluster.healthy(host, name) == [survivors[0].address], 20, name)

    died_at = time.monotonic()
    victim.die()
    assert victim.pids() == [] and victim.is_cut

    def new_leader() -> bool:
        leaders = {consul_cluster.leader(host) for host in survivors}
        return len(leaders) == 1 and leaders != {""} and leaders != {f"{victim.address}:8300"}

    hosts_lib.wait_for(new_leader, 30, "a new leader among the survivors")
    elected = time.monotonic() - died_at
    for host in survivors:
        assert consul_cluster.healthy(host, name) == [survivors[0].address]
    assert consul_cluster.put(survivors[1], f"/v1/kv/mh/{name}", "written without the dead server") is True
    print(f"\n  new leader {consul_cluster.leader_host(survivors[0])} {elected:.1f}s after {victim} died")

    # The host comes back: its agent starts again on its own data and rejoins.
    victim.restore()
    consul_cluster.start_agent(victim)
    consul_cluster.wait_ready(timeout=90)
    stop(server)


IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"
)


def netns_names() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


def test_teardown_leaves_nothing(hosts_lib, tmp_path):
    lab = hosts_lib.Lab(2, base_dir=tmp_path)
    names = [host.name for host in lab.hosts] + [lab.bridge_ns]
    try:
        a, b = lab.hosts
        hosts_lib.start_redis(a)
        a.spawn(["sh", "-c", "sleep 300 & sleep 300 & wait"])  # a shell and its two children
        b.spawn([sys.executable, "-c", IGNORES_SIGTERM], log_path=tmp_path / "stubborn.log")
        hosts_lib.wait_for(lambda: "ready" in (tmp_path / "stubborn.log").read_text(), 10, "the SIGTERM handler")
        pids = hosts_lib.wait_for(lambda: len(lab.pids()) == 5 and lab.pids(), 10, "5 processes in the lab")
        assert set(names) <= set(netns_names())
    finally:
        started = time.monotonic()
        lab.close(grace=1.0)  # b's process ignores SIGTERM: it gets SIGKILL after 1 s
        took = time.monotonic() - started
        print(f"\n  a lab of 2 hosts with 5 processes torn down in {took:.1f}s")
    assert took >= 1.0  # the SIGKILL came after the grace

    assert lab.leftovers() == []
    assert not set(names) & set(netns_names())
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(lab.dir) not in mounts and lab.name not in mounts
    assert not os.path.ismount(STATE_PATH)
    assert not any(pid_alive(pid) for pid in pids)
    assert subprocess.run(["ip", "link", "show", lab.client_link], capture_output=True).returncode != 0
    assert not lab.ns_dir.exists()
    assert (a.state_dir / "redis").is_dir()  # a lab given a base_dir keeps the hosts' files for inspection


def test_a_lab_that_fails_half_built_leaves_nothing(hosts_lib, tmp_path, monkeypatch):
    netns_before, links_before = set(netns_names()), ip_links()
    create = hosts_lib.Host._create

    def create_then_fail_on_b(host) -> None:
        create(host)
        if host.letter == "b":
            raise hosts_lib.LabError("injected failure")

    monkeypatch.setattr(hosts_lib.Host, "_create", create_then_fail_on_b)
    with pytest.raises(hosts_lib.LabError, match="injected failure"):
        hosts_lib.Lab(3, base_dir=tmp_path)

    assert set(netns_names()) <= netns_before
    assert ip_links() <= links_before
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def ip_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
