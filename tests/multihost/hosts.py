"""Several test "hosts" on one Linux machine: network namespaces on a private bridge, each with its own filesystem
for the services' state, plus a Consul cluster and a Redis server on them. Needs root, iproute2 and util-linux.

    with Lab(hosts=3) as lab:                    # hosts a, b, c at 198.18.<k>.1, .2, .3
        consul = start_consul(lab)               # a Consul agent on every host; a, b and c are the servers
        redis = start_redis(lab["a"])            # Redis on host a: redis.url is redis://198.18.<k>.1:6379/0
        b = lab["b"]
        env = {"MODELGRID_REGISTRY_CONSUL_URL": b.consul_url, "MODELGRID_REGISTRY_REDIS_URL": redis.url}
        b.spawn([sys.executable, "-m", "services.registry"], env, b.log_dir / "registry.log")  # -> Popen
        b.run(["ls", "/var/lib/modelgrid"])      # a short command on b (CompletedProcess, output captured)
        consul.healthy(lab["c"], "registry")     # ask c's agent, from the test process
        b.cut(); b.restore()                     # pull b's cable and plug it back
        b.die()                                  # b crashes: its processes are killed (SIGKILL) and it is cut

The layout of a lab (one run id, e.g. "3f9a1c", so that parallel labs never collide)::

    [root namespace: the test process]
        mglab<k> 198.18.<k>.254/24  ---.       (the "client link": the test process reaches every host directly)
    [namespace mg-3f9a1c-net]         |
        br0 (a bridge, no address, attached to no real interface)
          port-client ----------------'
          port-a  ---  [namespace mg-3f9a1c-a]  eth0 198.18.<k>.1/24, lo
          port-b  ---  [namespace mg-3f9a1c-b]  eth0 198.18.<k>.2/24, lo
          port-c  ---  [namespace mg-3f9a1c-c]  eth0 198.18.<k>.3/24, lo

- A host's only route is the lab subnet (no default route, IPv6 off): it reaches the other hosts, the test process
  (198.18.<k>.254) and its own loopback, nothing else. `cut()` sets the host's port on the bridge down.
- Each host also has a mount namespace of its own in which its directory `<lab dir>/hosts/<letter>/state` is
  mounted over STATE_PATH (/var/lib/modelgrid): a file written there on host b is invisible on host c and on the
  machine itself (`host.state_dir` is where the test process finds it). Everything else of the filesystem is shared.
- Every process of a host runs through `nsenter` into both namespaces; `kill_all()` and `Lab.close()` find a
  host's processes by their namespaces in /proc (children of children included) and kill them by pid.
- `Lab.close()` (also at interpreter exit) kills every process, deletes the namespaces (the veth pairs go with them)
  and unmounts everything it mounted; `Lab.leftovers()` says what, if anything, is still there.

The lab's /24 is the k-th of 198.18.0.0/15 (k = 0..511: 198.18.0.0/24 to 198.19.255.0/24; "198.18.<k>" above for
short). It is claimed by creating the root-side interface `mglab<k>` (interface names are unique, so the claim is
atomic): a lab takes the first free k from the one its run id suggests.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from services.kit.localinfra import consul_binary, pid_alive, redis_binary, redis_ping

STATE_PATH = "/var/lib/modelgrid"  # inside a host: its own directory; on the machine itself: an empty directory
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544's range for network tests: 512 lab subnets of /24
CLIENT_HOST_ID = 254  # the test process's address in a lab: 198.18.<k>.254
NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps its namespace files
COMMAND_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # lab requests never go to a proxy


class LabError(RuntimeError):
    """Building, using or tearing down a lab failed."""


def _run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command on the machine itself; LabError with its output if it fails and `check`."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")
    return result


def _ip(line: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip` with the arguments of `line` (split on spaces: names here never contain any)."""
    return _run(["ip", *line.split()], check=check)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call `condition` until it returns something truthy (returned), at most `timeout` seconds; else LabError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _ns_id(path: str | Path) -> tuple[int, int] | None:
    """Identity (device, inode) of a namespace file (/run/netns/x, /proc/<pid>/ns/mnt, ...), None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(namespaces: set[tuple[int, int]]) -> list[int]:
    """Pids of the live processes whose network or mount namespace is one of `namespaces`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (
            _ns_id(f"/proc/{entry}/ns/net") in namespaces or _ns_id(f"/proc/{entry}/ns/mnt") in namespaces
        ):
            found.append(int(entry))
    return [pid for pid in found if pid != os.getpid()]


def _kill_pids(find: Callable[[], list[int]], popens: Iterable[subprocess.Popen], grace: float) -> None:
    """Signal every pid `find` returns with SIGTERM (SIGKILL at once if grace <= 0) until none is left; SIGKILL
    what is still there after `grace` seconds. Our own children (`popens`) are reaped on the way."""
    popens = list(popens)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if sig == signal.SIGTERM and grace <= 0:
            continue
        deadline = time.monotonic() + wait
        while True:
            for popen in popens:
                popen.poll()  # reap, so that an exited child is not left as a zombie
            pids = [pid for pid in find() if pid_alive(pid)]
            if not pids:
                for popen in popens:
                    popen.poll()
                return
            if time.monotonic() > deadline:
                break
            for pid in pids:  # again each round: a process may have forked meanwhile
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
    raise LabError(f"processes survived SIGKILL: {find()}")


class Host:
    """One test host: a network namespace (eth0 on the lab bridge) and a mount namespace (its own STATE_PATH)."""

    def __init__(self, lab: Lab, index: int) -> None:
        self.lab = lab
        self.letter = chr(ord("a") + index)
        self.name = f"{lab.name}-{self.letter}"  # the network namespace's name, also the Consul node name
        self.address = str(lab.subnet[index + 1])
        self.dir = lab.dir / "hosts" / self.letter
        self.state_dir = self.dir / "state"  # what the host sees at STATE_PATH
        self.log_dir = self.dir / "logs"  # outside STATE_PATH: the test process reads logs here
        self.netns_file = NETNS_DIR / self.name
        self.mntns_file = lab.ns_dir / f"{self.letter}.mnt"
        self.bridge_port = f"port-{self.letter}"  # this host's veth end in the bridge namespace
        self.processes: list[subprocess.Popen] = []
        self._namespaces: set[tuple[int, int]] = set()

    def __repr__(self) -> str:
        return f"Host({self.letter}, {self.address})"

    @property
    def consul_url(self) -> str:
        """The Consul agent of this host as the host's own processes reach it (after `start_consul`)."""
        return "http://127.0.0.1:8500"

    # -- building and tearing down -----------------------------------------------------------------------------

    def _create(self) -> None:
        self.state_dir.mkdir(parents=True)
        self.log_dir.mkdir(parents=True)
        _ip(f"netns add {self.name}")
        self._remember_namespace(self.netns_file)
        _quiet_namespace(self.name)
        bridge = self.lab.bridge_ns
        _ip(f"-n {bridge} link add {self.bridge_port} type veth peer name eth0 netns {self.name}")
        _ip(f"-n {bridge} link set {self.bridge_port} master br0 up")
        _ip(f"-n {self.name} addr add {self.address}/{self.lab.subnet.prefixlen} dev eth0")
        _ip(f"-n {self.name} link set eth0 up")
        # A persistent mount namespace: `unshare --mount=<file>` binds it to the file, which must live on a private
        # mount (the lab's ns dir). In it, with private propagation, the host's state dir goes over STATE_PATH.
        self.mntns_file.touch()
        unshare = ["unshare", f"--mount={self.mntns_file}", "--propagation", "private", "--"]
        _run([*unshare, "mount", "--bind", str(self.state_dir), STATE_PATH])
        self._remember_namespace(self.mntns_file)

    def _remember_namespace(self, path: Path) -> None:
        identity = _ns_id(path)
        if identity is None:
            raise LabError(f"namespace file {path} is missing")
        self._namespaces.add(identity)

    def _delete_namespaces(self) -> None:
        """Delete the network namespace and unmount/remove the mount namespace file (no process may be left)."""
        if self.netns_file.exists():
            _ip(f"netns delete {self.name}")
        if self.mntns_file.exists():
            if _ns_id(self.mntns_file) in self._namespaces:  # still the namespace bound to it
                _run(["umount", str(self.mntns_file)])
            self.mntns_file.unlink()

    # -- processes -----------------------------------------------------------------------------------------------

    def command(self, argv: Sequence[str], cwd: str | Path | None = None) -> list[str]:
        """`argv` wrapped to run inside this host's namespaces (cwd resolved inside; default: the current one)."""
        cwd = Path(cwd) if cwd is not None else Path.cwd()
        return ["nsenter", f"--net={self.netns_file}", f"--mount={self.mntns_file}", f"--wdns={cwd}", "--", *argv]

    def spawn(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen:
        """Start a long-running process on this host; its stdout and stderr go to `log_path` (default: a new file
        in `log_dir`). `env` is added to the test process's environment. The host keeps the Popen for kill_all."""
        if log_path is None:
            log_path = self.log_dir / f"{Path(argv[0]).name}-{len(self.processes)}.log"
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                self.command(argv, cwd),
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(popen)
        return popen

    def run(
        self,
        argv: Sequence[str],
        timeout: float = COMMAND_TIMEOUT_S,
        check: bool = True,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a short command on this host and return it finished (text stdout/stderr captured); LabError if it
        fails and `check`. On timeout the command is killed (subprocess.TimeoutExpired)."""
        result = subprocess.run(
            self.command(argv),
            env={**os.environ, **(env or {})},
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise LabError(f"on {self.letter}: {' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def python(self, code: str, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
        """Run Python code on this host with the test's interpreter; returns its stdout, stripped."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check).stdout.strip()

    def pids(self) -> list[int]:
        """Every live process of this host (whatever started it), found by its namespaces."""
        return _pids_in(self._namespaces)

    def kill_all(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every process of this host, SIGKILL what is left after `grace` seconds (at once if grace <= 0)."""
        _kill_pids(self.pids, self.processes, grace)

    # -- the network -----------------------------------------------------------------------------------------------

    def cut(self) -> None:
        """Pull the host's cable: its port on the bridge goes down. The host keeps its eth0 up with its address and
        route (it sees no carrier and can reach nobody); the other hosts and the test process see it vanish."""
        _ip(f"-n {self.lab.bridge_ns} link set {self.bridge_port} down")

    def restore(self) -> None:
        """Plug the cable back in (the bridge port goes up again)."""
        _ip(f"-n {self.lab.bridge_ns} link set {self.bridge_port} up")

    @property
    def is_cut(self) -> bool:
        out = _ip(f"-n {self.lab.bridge_ns} -o link show {self.bridge_port}").stdout
        flags = out.split("<", 1)[1].split(">", 1)[0].split(",")  # "5: port-a@if2: <BROADCAST,MULTICAST,UP,...>"
        return "UP" not in flags

    def die(self) -> None:
        """The host crashes: every process of it is killed with SIGKILL (nothing flushes, nobody says goodbye) and
        its cable is pulled. `restore()` brings the network back; processes must be started again."""
        self.cut()
        self.kill_all(grace=0)


class Lab:
    """N test hosts on a private bridge (see the module docstring). Use as a context manager, or call close().

    `base_dir`: where the lab keeps its files (hosts' state and logs stay there after close, for inspection);
    default: a new temporary directory, removed on close."""

    def __init__(self, hosts: int = 3, base_dir: str | Path | None = None) -> None:
        if not 1 <= hosts <= 26:
            raise ValueError("a lab has 1 to 26 hosts (a..z)")
        self.run_id = secrets.token_hex(3)
        self.name = f"mg-{self.run_id}"
        self.bridge_ns = f"{self.name}-net"
        self._own_dir = base_dir is None
        parent = Path(tempfile.gettempdir()) if base_dir is None else Path(base_dir)
        parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=parent)).resolve()
        self.ns_dir = self.dir / "ns"  # a private bind mount holding the mount namespace files
        self.subnet: ipaddress.IPv4Network = LAB_RANGE  # the real /24 once claimed
        self.client_link = ""  # the root-side interface, mglab<k>
        self.client_address = ""
        self.hosts: list[Host] = []
        self._ns_dir_mounted = False
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(hosts)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Lab({self.name}, {self.subnet}, {self.hosts})"

    def __getitem__(self, letter: str) -> Host:
        """lab["b"]: the host by its letter."""
        for host in self.hosts:
            if host.letter == letter:
                return host
        raise KeyError(letter)

    def host_at(self, address: str) -> Host:
        """The host with this address ("198.18.7.2" or "198.18.7.2:8300")."""
        ip = address.rsplit(":", 1)[0] if ":" in address else address
        for host in self.hosts:
            if host.address == ip:
                return host
        raise KeyError(address)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _build(self, count: int) -> None:
        self.ns_dir.mkdir()
        _run(["mount", "--bind", str(self.ns_dir), str(self.ns_dir)])
        self._ns_dir_mounted = True
        _run(["mount", "--make-private", str(self.ns_dir)])
        Path(STATE_PATH).mkdir(parents=True, exist_ok=True)  # the mount point (left in place: other labs use it)

        _ip(f"netns add {self.bridge_ns}")
        _quiet_namespace(self.bridge_ns)
        _ip(f"-n {self.bridge_ns} link add br0 type bridge")
        _ip(f"-n {self.bridge_ns} link set br0 up")
        self._claim_subnet()
        for index in range(count):
            host = Host(self, index)
            self.hosts.append(host)
            host._create()

    def _claim_subnet(self) -> None:
        """Create the client link mglab<k> <-> port-client for the first free k, and give the test process its
        address 198.18.<k>.254 on it."""
        subnets = list(LAB_RANGE.subnets(new_prefix=24))
        first = int(self.run_id, 16) % len(subnets)
        for step in range(len(subnets)):
            k = (first + step) % len(subnets)
            link = f"mglab{k}"
            claim = _ip(f"link add {link} type veth peer name port-client netns {self.bridge_ns}", check=False)
            if claim.returncode == 0:
                break
            if "exists" not in claim.stderr:  # taken by another lab: try the next k; anything else is an error
                raise LabError(f"cannot create {link}: {claim.stderr.strip()}")
        else:
            raise LabError("all 512 lab subnets of 198.18.0.0/15 are taken")
        self.client_link, self.subnet = link, subnets[k]
        self.client_address = str(self.subnet[CLIENT_HOST_ID])
        Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1\n")
        _ip(f"addr add {self.client_address}/24 dev {link}")
        _ip(f"link set {link} up")
        _ip(f"-n {self.bridge_ns} link set port-client master br0 up")

    def pids(self) -> list[int]:
        """Every live process on any host of the lab."""
        return _pids_in({ns for host in self.hosts for ns in host._namespaces})

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """Kill every process of every host (SIGTERM, SIGKILL after `grace` seconds), delete the namespaces, unmount
        and remove what the lab mounted and created. Tries every step; raises LabError at the end if one failed."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors: list[str] = []

        def attempt(step: Callable[[], Any]) -> None:
            try:
                step()
            except Exception as error:  # keep tearing down, report at the end
                errors.append(str(error))

        attempt(lambda: _kill_pids(self.pids, [p for h in self.hosts for p in h.processes], grace))
        for host in self.hosts:
            attempt(host._delete_namespaces)
        if (NETNS_DIR / self.bridge_ns).exists():
            attempt(lambda: _ip(f"netns delete {self.bridge_ns}"))
        if self.client_link:  # normally gone with its peer in the bridge namespace; wait for that to happen
            attempt(lambda: wait_for(lambda: not _link_exists(self.client_link), 10, f"{self.client_link} to go"))
        if self._ns_dir_mounted:
            attempt(lambda: _run(["umount", str(self.ns_dir)]))
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.ns_dir.exists():
            attempt(lambda: shutil.rmtree(self.ns_dir))
        if errors:
            raise LabError(f"{self.name} teardown: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this lab is still on the machine (empty after a clean close): namespaces, mounts, processes,
        the client link."""
        found = [f"netns {n}" for n in _ip("netns list").stdout.split() if n.startswith(f"{self.name}-")]
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if str(self.dir) in line or f"{NETNS_DIR}/{self.name}-" in line:
                found.append(f"mount {line}")
        found += [f"process {pid}" for pid in self.pids() if pid_alive(pid)]
        if self.client_link and _link_exists(self.client_link):
            found.append(f"link {self.client_link}")
        return found


def _link_exists(name: str) -> bool:
    return _ip(f"link show {name}", check=False).returncode == 0


def _quiet_namespace(netns: str) -> None:
    """Loopback up and IPv6 off in a new network namespace: the lab speaks IPv4 on 198.18.<k>.0/24 only."""
    code = "for k in all default; do echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6; done; ip link set lo up"
    _run(["nsenter", f"--net={NETNS_DIR / netns}", "--", "sh", "-c", code])


# -- HTTP to a lab address (from the test process, over the client link) -----------------------------------------


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 3.0, headers: dict[str, str] | None = None
) -> Any:
    """One HTTP request with an optional JSON body and headers (e.g. a Consul ACL token); returns the decoded JSON
    reply (None if empty). Raises OSError (urllib.error.URLError/HTTPError included) when it fails."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with _NO_PROXY.open(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


# -- Consul -------------------------------------------------------------------------------------------------------

CONSUL_HTTP_PORT = 8500
CONSUL_SERVER_PORT = 8300  # Raft and server RPC
# Short timings for tests: Raft at its fastest (elections in ~1 s), a server that (re)joins becomes a voter after
# 2 s of good health instead of 10, and a LAN gossip that notices a dead or cut-off agent in a few seconds instead of
# tens. Not configurable in Consul 1.8: Serf takes a failed member back only on its reconnect round, every 30 s.
CONSUL_TEST_HCL = """
disable_update_check = true
leave_on_terminate = true
performance { raft_multiplier = 1 }
autopilot { server_stabilization_time = "2s" }
gossip_lan {
  gossip_interval = "100ms"
  probe_interval = "500ms"
  probe_timeout = "250ms"
  suspicion_mult = 3
}
"""
MEMBER_ALIVE, MEMBER_LEFT, MEMBER_FAILED = 1, 3, 4  # Serf member status in /v1/agent/members


class ConsulCluster:
    """The Consul agents of a lab, one per host; `servers` are the first hosts. Every agent's HTTP API listens on
    its host's loopback (for the host's services: `host.consul_url`) and on its host's address (for the test
    process: `url(host)`). Built by `start_consul`."""

    def __init__(self, lab: Lab, servers: int) -> None:
        if not 1 <= servers <= len(lab.hosts):
            raise ValueError(f"servers must be 1..{len(lab.hosts)}")
        self.lab = lab
        self.servers = lab.hosts[:servers]
        self.agents: dict[str, subprocess.Popen] = {}  # host letter -> the agent's process

    def start_agent(self, host: Host) -> subprocess.Popen:
        """Start (or start again, e.g. after `host.die()` and `host.restore()`) the agent of `host`, without
        waiting: a server with the other servers to join, a client with all of them."""
        peers = [server.address for server in self.servers if server is not host]
        argv = [
            consul_binary(),
            "agent",
            f"-node={host.name}",
            f"-bind={host.address}",
            f"-client=127.0.0.1 {host.address}",
            f"-http-port={CONSUL_HTTP_PORT}",
            f"-data-dir={STATE_PATH}/consul",
            "-grpc-port=-1",  # no Envoy xDS
            "-dns-port=-1",  # nothing here asks Consul's DNS
            "-retry-interval=1s",
            *[f"-retry-join={peer}" for peer in peers],
            *(["-server", f"-bootstrap-expect={len(self.servers)}"] if host in self.servers else []),
            f"-hcl={CONSUL_TEST_HCL}",
        ]
        self.agents[host.letter] = host.spawn(argv, log_path=host.log_dir / "consul.log")
        return self.agents[host.letter]

    def url(self, host: Host) -> str:
        return f"http://{host.address}:{CONSUL_HTTP_PORT}"

    def get(self, host: Host, path: str, timeout: float = 3.0) -> Any:
        """GET /v1/... from `host`'s agent, decoded."""
        return http_json("GET", self.url(host) + path, timeout=timeout)

    def put(self, host: Host, path: str, body: Any = None, timeout: float = 3.0) -> Any:
        """PUT /v1/... to `host`'s agent with a JSON body, decoded reply."""
        return http_json("PUT", self.url(host) + path, body, timeout=timeout)

    def leader(self, host: Host) -> str:
        """The Raft leader ("198.18.k.i:8300") `host`'s agent knows, "" if none or the agent does not answer."""
        try:
            return self.get(host, "/v1/status/leader", timeout=1.0) or ""
        except (OSError, ValueError):
            return ""

    def leader_host(self, asking: Host | None = None) -> Host | None:
        """The host of the current leader, asked of `asking` (default: the first server that answers)."""
        for host in [asking] if asking else self.servers:
            leader = self.leader(host)
            if leader:
                return self.lab.host_at(leader)
        return None

    def members(self, host: Host) -> dict[str, int]:
        """Node name -> Serf status (MEMBER_ALIVE, ...) as `host`'s agent sees the LAN; {} if it does not answer."""
        try:
            return {m["Name"]: m["Status"] for m in self.get(host, "/v1/agent/members", timeout=1.0)}
        except (OSError, ValueError):
            return {}

    def voters(self, host: Host) -> set[str]:
        """Raft voters ("198.18.k.i:8300") as `host`'s agent has them from the leader; empty if it cannot tell."""
        try:
            configuration = self.get(host, "/v1/operator/raft/configuration", timeout=1.0)
        except (OSError, ValueError):
            return set()
        return {server["Address"] for server in configuration["Servers"] if server["Voter"]}

    def healthy(self, host: Host, service: str) -> list[str]:
        """Addresses of the passing instances of `service`, asked of `host`'s agent ([] if it does not answer)."""
        try:
            entries = self.get(host, f"/v1/health/service/{service}?passing=true", timeout=1.0)
        except (OSError, ValueError):
            return []
        return [entry["Service"]["Address"] or entry["Node"]["Address"] for entry in entries]

    def wait_ready(self, hosts: Sequence[Host] | None = None, timeout: float = 60.0) -> None:
        """Until each of `hosts` (default: every host with an agent) knows a leader and sees all of `hosts` alive,
        and every server among them is a Raft voter (a server that rejoins is a non-voter for a while: losing
        another server before it votes again would lose the quorum)."""
        hosts = list(hosts) if hosts is not None else [h for h in self.lab.hosts if h.letter in self.agents]
        names = {h.name for h in hosts}
        voters = {f"{h.address}:{CONSUL_SERVER_PORT}" for h in hosts if h in self.servers}

        def ready() -> bool:
            for host in hosts:
                agent = self.agents[host.letter]
                if agent.poll() is not None:
                    raise LabError(f"the Consul agent on {host} exited ({agent.returncode}); see {host.log_dir}")
                members = self.members(host)
                if not self.leader(host) or any(members.get(name) != MEMBER_ALIVE for name in names):
                    return False
            return voters <= self.voters(hosts[0])

        wait_for(ready, timeout, f"a Consul leader, {sorted(names)} alive and {sorted(voters)} voting")


def start_consul(lab: Lab, servers: int = 3, timeout: float = 60.0) -> ConsulCluster:
    """Start a Consul agent on every host of `lab`, the first `servers` hosts as servers (`-bootstrap-expect`),
    the others as clients; return once there is a leader and every agent sees every other alive. Data in
    STATE_PATH/consul on each host, log in the host's log_dir/consul.log."""
    cluster = ConsulCluster(lab, servers)
    for host in lab.hosts:
        cluster.start_agent(host)
    cluster.wait_ready(timeout=timeout)
    return cluster


# -- Redis --------------------------------------------------------------------------------------------------------


@dataclass
class LabRedis:
    host: Host
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        """Client URL for any host (and the test process): redis://198.18.k.i:6379/0."""
        return f"redis://{self.host.address}:{self.port}/0"


def start_redis(host: Host, port: int = 6379, timeout: float = 30.0) -> LabRedis:
    """Start Debian's redis-server on `host`, bound to its address and its loopback, AOF on (fsync every second)
    and RDB off, data in STATE_PATH/redis; return once it answers PING."""
    (host.state_dir / "redis").mkdir(exist_ok=True)
    argv = [
        redis_binary(),
        "--port", str(port),
        "--bind", host.address, "127.0.0.1",
        "--protected-mode", "no",  # no password: clients come from the other hosts of the closed lab network
        "--dir", f"{STATE_PATH}/redis",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
    ]  # fmt: skip
    process = host.spawn(argv, log_path=host.log_dir / "redis.log")

    def answers() -> bool:
        if process.poll() is not None:
            raise LabError(f"redis-server on {host} exited ({process.returncode}); see {host.log_dir}/redis.log")
        return redis_ping(host.address, port)

    wait_for(answers, timeout, f"Redis on {host}", interval=0.05)
    return LabRedis(host, port, process)
