"""Start and stop a real Consul dev agent and a real Redis server on loopback, for `make up` and for tests.

Library use (tests; every port is free and chosen, so parallel runs never collide)::

    with ConsulAgent(tmp_path / "consul") as consul, RedisServer(tmp_path / "redis") as redis:
        ...  # consul.http_url, redis.url
        token = consul.token_for("registry")  # Consul has ACLs on (default deny): a token per service

Command line (`make up`; the processes keep running after the command exits)::

    python -m services.kit.localinfra up --state-dir .run [--consul-port 8500] [--redis-port 6379]
    python -m services.kit.localinfra status --state-dir .run
    python -m services.kit.localinfra down --state-dir .run

Redis requires a password: the first `up` makes a random one in <state-dir>/redis-password (mode 0600), which later
runs, `status` and scripts/mesh.py (its services' REDIS_PASSWORD_FILE) use; `down` leaves it there.
Consul denies what a token does not allow: `up` keeps its master token in <state-dir>/consul-master-token and
scripts/mesh.py the token of each service in <state-dir>/consul-tokens/<name> (mode 0600; its CONSUL_TOKEN_FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from services.kit import tls
from services.kit.consul_acl import (
    TOKEN_ENV,
    TOKEN_HEADER,
    AclSetupError,
    ConsulAcl,
    read_token_file,
    write_token_file,
)
from services.kit.private_files import write_private_file
from services.kit.redis_auth import (
    RedisPasswordError,
    generate_password,
    read_password_file,
    requirepass_directive,
    url_with_password,
    write_password_file,
    write_redis_auth_config,
)

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
REDIS_PASSWORD_FILE = "redis-password"
"""The file in a state dir that keeps the password of the Redis server started there (mode 0600)."""
REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CONSUL_BINARY = REPO_ROOT / ".tools" / "consul" / "usr" / "bin" / "consul"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20
CONSUL_MASTER_TOKEN_FILE = "consul-master-token"  # in the state dir, mode 0600
CONSUL_TOKEN_DIR = "consul-tokens"  # in the state dir: one file (mode 0600) per service token
TLS_DIR = "tls"  # in the state dir: the mesh's CA and a certificate per service (kit.tls)
# Loopback requests must never go through an HTTP proxy configured in the environment.
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class InfraError(RuntimeError):
    """A local infrastructure process is missing, failed to start, or does not answer."""


class _PortInUse(InfraError):
    """The process exited at start because one of its ports was taken meanwhile."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


FREE_PORT_LOW = 20000
"""free_ports() picks from FREE_PORT_LOW up to the kernel's ephemeral range, never inside it: the kernel hands
ephemeral ports to outgoing connections and to bind(port 0) all the time, so a port picked from that range can be
taken between the pick and the service's bind (seen under parallel test runs)."""
KERNEL_PORTS_ENV = "MODELGRID_KERNEL_PORTS"
"""Set to 1 in the environment of a service a test starts (kit.processes): the ports that service picks for itself (a
replica's worker metrics ports) come from the kernel, never from the range the test process picks from, so it cannot
take a port the test picked for a service that has not bound it yet."""
_RECENT_PICKS: deque[int] = deque(maxlen=1024)
"""What free_ports() handed out lately in this process: never handed out again while here, since a picked port may
not be bound yet (services started together import for seconds before they bind; seen: a gateway bound as its web
port the port picked next for a predictor still importing TensorFlow)."""
_PICK_LOCK = threading.Lock()


def _pick_range() -> range:
    """The ports free_ports() picks from: below the ephemeral range, split between parallel test workers
    (pytest-xdist's PYTEST_XDIST_WORKER=gw<i> of PYTEST_XDIST_WORKER_COUNT) so that they never pick the same.
    Empty (the kernel chooses) in a service a test started (KERNEL_PORTS_ENV)."""
    if os.environ.get(KERNEL_PORTS_ENV) == "1":
        return range(0)
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    if ephemeral_low - FREE_PORT_LOW < 2000:
        return range(0)  # no room below it: let the kernel choose
    span = range(FREE_PORT_LOW, ephemeral_low)
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and workers.isdigit() and int(workers) > 1:
        share = len(span) // int(workers)
        start = span.start + share * (int(worker[2:]) % int(workers))
        span = range(start, start + share)
    return span


def free_ports(count: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (held open together while chosen, so
    none repeats), none of them in `exclude` or handed out lately by this process; below the kernel's ephemeral range
    when there is room (_pick_range)."""
    with _PICK_LOCK:
        ports = _free_ports(count, exclude | set(_RECENT_PICKS))
        _RECENT_PICKS.extend(ports)
        return ports


def _free_ports(count: int, exclude: set[int] | frozenset[int]) -> list[int]:
    sockets: list[socket.socket] = []
    span = _pick_range()
    try:
        ports: list[int] = []
        attempts = 0
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            attempts += 1
            if span and attempts <= 50 * count:
                try:
                    sock.bind((LOOPBACK, random.choice(span)))
                except OSError:
                    continue  # taken: another pick
            else:
                sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
            if port not in exclude and port not in ports:
                ports.append(port)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def consul_binary() -> str:
    """Path of the Consul binary: $MODELGRID_CONSUL_BIN, the repo's .tools copy, or `consul` on PATH."""
    override = os.environ.get("MODELGRID_CONSUL_BIN")
    if override:
        return _executable(override, "MODELGRID_CONSUL_BIN")
    if REPO_CONSUL_BINARY.is_file():
        return str(REPO_CONSUL_BINARY)
    on_path = shutil.which("consul")
    if on_path:
        return on_path
    raise InfraError(f"consul not found (looked at {REPO_CONSUL_BINARY} and PATH): run `make setup`")


def redis_binary() -> str:
    """Path of the Redis server binary: $MODELGRID_REDIS_BIN or `redis-server` on PATH (Debian's)."""
    override = os.environ.get("MODELGRID_REDIS_BIN")
    if override:
        return _executable(override, "MODELGRID_REDIS_BIN")
    found = shutil.which("redis-server")
    if found:
        return found
    if Path("/usr/bin/redis-server").is_file():
        return "/usr/bin/redis-server"
    raise InfraError("redis-server not found: run `make setup` (it installs Debian's redis-server)")


def sentinel_binary() -> list[str]:
    """The command that runs a Redis Sentinel: Debian's `redis-sentinel` (package redis-sentinel), else
    `redis-server --sentinel` (the same program)."""
    found = shutil.which("redis-sentinel") or (
        "/usr/bin/redis-sentinel" if Path("/usr/bin/redis-sentinel").is_file() else None
    )
    if found:
        return [found]
    return [redis_binary(), "--sentinel"]


def _executable(path: str, variable: str) -> str:
    if not os.access(path, os.X_OK):
        raise InfraError(f"${variable} points at {path}, which is not an executable file")
    return path


def consul_leader(http_addr: str, timeout: float = 1.0) -> str:
    """Return the Raft leader address the agent at http_addr reports, or "" if it has none or is down."""
    try:
        with NO_PROXY_OPENER.open(f"http://{http_addr}/v1/status/leader", timeout=timeout) as response:
            return str(json.load(response))
    except (OSError, ValueError):
        return ""


def redis_ping(host: str, port: int, timeout: float = 1.0, password: str | None = None) -> bool:
    """True if the Redis server at host:port answers PING with PONG (raw RESP, no client library), after AUTH with
    `password` if one is given. A server that requires a password answers NOAUTH to a PING without one, and one that
    rejects the password (or has none) answers an error to the AUTH: both are False."""
    commands = [("PING",)] if password is None else [("AUTH", password), ("PING",)]
    request = b"".join(_resp_command(*command) for command in commands)
    replies = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            while replies.count(b"\r\n") < len(commands):
                chunk = sock.recv(256)
                if not chunk:
                    break
                replies += chunk
    except OSError:
        return False
    expected = [b"+PONG"] if password is None else [b"+OK", b"+PONG"]
    return replies.split(b"\r\n")[: len(commands)] == expected


def _resp_command(*args: str) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _flatten(options: dict[str, str]) -> list[str]:
    """{"--port": "1"} -> ["--port", "1"]: command-line options in the order given."""
    return [part for option in options.items() for part in option]


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _LoopbackProcess:
    """One server process on loopback: launched, waited for until it answers, stopped with SIGTERM."""

    name = "process"

    def __init__(self, state_dir: Path | str, *, detached: bool = False) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.log_path = self.state_dir / f"{self.name}.log"
        self._detached = detached
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the running process, None before start and after stop."""
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        """Launch the process and block until it answers; retry with new ports if a chosen port got taken."""
        if self._popen is not None:
            raise InfraError(f"{self.name} already started (pid {self._popen.pid})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._launch_and_wait()
                return
            except _PortInUse:
                if attempt == PORT_ATTEMPTS or not self._choose_new_ports():
                    raise
                logger.warning("%s: a port was taken, retrying with new ports", self.name)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Send SIGTERM, wait up to timeout seconds, then SIGKILL. Safe to call when not running."""
        if self._popen is None:
            return
        popen, self._popen = self._popen, None
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s pid %s ignored SIGTERM for %ss, killing it", self.name, popen.pid, timeout)
                popen.kill()
                popen.wait()
        logger.info("%s stopped (pid %s, exit code %s)", self.name, popen.pid, popen.returncode)

    def kill(self) -> None:
        """Send SIGKILL and reap the process (no chance to flush anything)."""
        if self._popen is None:
            return
        popen, self._popen = self._popen, None
        popen.kill()
        popen.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def _choose_new_ports(self) -> bool:
        """Pick new free ports if this instance chose its own; False if the ports were given."""
        return False

    def _launch_and_wait(self) -> None:
        command = self._command()
        logger.info("starting %s: %s", self.name, " ".join(command))
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self._detached,
                cwd=self.state_dir,  # what a process writes to its current directory stays with its state
            )
        started = time.monotonic()
        try:
            self._wait_until_answering(started)
        except BaseException:  # also Ctrl-C: never leave a half-started process behind
            self.kill()
            raise
        logger.info("%s ready in %.2fs (pid %s)", self.name, time.monotonic() - started, self.pid)

    def _wait_until_answering(self, started: float) -> None:
        while not self._answers():
            if self._popen is None or self._popen.poll() is not None:
                self._raise_start_failure("exited before answering")
            if time.monotonic() - started > READY_TIMEOUT_S:
                self._raise_start_failure(f"did not answer within {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.05)

    def _raise_start_failure(self, what: str) -> None:
        tail = _log_tail(self.log_path)
        message = f"{self.name} {what}; last lines of {self.log_path}:\n{tail}"
        if "address already in use" in tail.lower():
            raise _PortInUse(message)
        raise InfraError(message)


class ConsulAgent(_LoopbackProcess):
    """A real `consul agent -dev` (in-memory server, its own leader) with every port on loopback chosen, and ACLs
    on: `default_policy = "deny"`, a master token (`master_token`: $CONSUL_HTTP_TOKEN if set, so that one test
    session gives all its agents one; else the one kept in the state dir; else a new one), an agent token of its
    own, and a token per modelgrid service (`token_for(name)`, kit.consul_acl).

    The master token is kept in <state dir>/consul-master-token and each service token in
    <state dir>/consul-tokens/<name> (mode 0600). A dev agent forgets its ACLs when it stops: on each start it makes
    the kept service tokens again, so services that outlive a restart keep their token.

    `tls_dir` (ca.pem, consul.pem, consul-key.pem): the agent's gRPC health checks present that client certificate
    to services that require mTLS. The agent's own HTTP API stays plain HTTP on loopback.
    """

    name = "consul"
    _started: ClassVar[weakref.WeakValueDictionary[str, ConsulAgent]] = weakref.WeakValueDictionary()

    def __init__(
        self,
        state_dir: Path | str,
        *,
        http_port: int | None = None,
        detached: bool = False,
        tls_dir: Path | str | None = None,
    ) -> None:
        super().__init__(state_dir, detached=detached)
        self._http_port_given = http_port is not None
        self.http_port = http_port if http_port is not None else free_port()
        self._assign_other_ports()
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        self.master_token_file = self.state_dir / CONSUL_MASTER_TOKEN_FILE
        self.token_dir = self.state_dir / CONSUL_TOKEN_DIR
        self.config_file = self.state_dir / "consul-config.json"
        self.master_token = os.environ.get(TOKEN_ENV, "").strip() or (
            read_token_file(self.master_token_file) if self.master_token_file.is_file() else str(uuid.uuid4())
        )
        self.node_name = ""
        self._acl: ConsulAcl | None = None

    @property
    def http_addr(self) -> str:
        """HTTP API address, e.g. "127.0.0.1:8500"."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def http_url(self) -> str:
        """HTTP API base URL, e.g. "http://127.0.0.1:8500"."""
        return f"http://{self.http_addr}"

    def start(self) -> None:
        """Launch the agent and block until it answers with its ACLs up; then make the kept tokens again, give it
        the agents' token, and wait until it has written its node to the catalog with that token."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        super().start()
        try:
            self._acl = ConsulAcl(self.http_url, self.master_token, token_dir=self.token_dir)
            self._acl.restore()
            self._acl.set_agent_token()
            self._wait_until_node_synced()
            ConsulAgent._started[self.http_url] = self
        except (AclSetupError, OSError) as exc:
            self.kill()
            raise InfraError(f"consul: the ACL setup failed: {exc}") from None

    def token_for(self, service: str) -> str:
        """The ACL token of the modelgrid service `service` (a Consul service name such as "registry" or
        "trainer-agent"): it may register, check and deregister instances of that name only, and read the health
        of every service. Made on the first call, the same one afterwards. `token_for(consul_acl.AGENT)`: the token
        of Consul agents (their own nodes), e.g. for client agents that join this one."""
        return self._admin().token_for(service)

    def token_file(self, service: str) -> Path:
        """The file (mode 0600) holding the token of `service` (see token_for), for a `consul_token_file` setting."""
        return self._admin().token_file(service)

    def _admin(self) -> ConsulAcl:
        if self._acl is None or self.pid is None:
            raise InfraError("consul is not running: start it before asking for tokens")
        return self._acl

    def _write_config(self) -> None:
        """The ACL (and check TLS) configuration, mode 0600: it holds the master token."""
        config: dict[str, object] = {
            "acl": {
                "enabled": True,
                "default_policy": "deny",
                "down_policy": "extend-cache",
                "enable_token_persistence": True,
                "tokens": {"master": self.master_token},
            }
        }
        if self.tls_dir is not None:
            files = {"ca_file": "ca.pem", "cert_file": "consul.pem", "key_file": "consul-key.pem"}
            missing = [name for name in files.values() if not (self.tls_dir / name).is_file()]
            if missing:
                raise InfraError(f"consul: tls_dir {self.tls_dir} lacks {', '.join(missing)}")
            config.update({key: str(self.tls_dir / name) for key, name in files.items()})
            config["enable_agent_tls_for_checks"] = True
            config["server_name"] = "modelgrid"  # the checks' SNI: every certificate names it (kit.tls.MESH_NAME)
        write_private_file(self.config_file, json.dumps(config, indent=2) + "\n")
        if not self.master_token_file.is_file() or read_token_file(self.master_token_file) != self.master_token:
            write_token_file(self.master_token_file, self.master_token)

    def _wait_until_node_synced(self, timeout: float = 10.0) -> None:
        """Until the agent has written its node (with its tagged addresses) to the catalog with its new token."""
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(f"{self.http_url}/v1/catalog/node/{self.node_name}")
        request.add_header(TOKEN_HEADER, self.master_token)
        while time.monotonic() < deadline:
            with NO_PROXY_OPENER.open(request, timeout=2) as response:
                node = (json.load(response) or {}).get("Node") or {}
            if node.get("TaggedAddresses"):
                return
            time.sleep(0.05)
        logger.warning("consul: node %s not synced to the catalog within %.0fs", self.node_name, timeout)

    def _assign_other_ports(self) -> None:
        ports = free_ports(4, exclude={self.http_port})
        self.dns_port, self.serf_lan_port, self.serf_wan_port, self.server_port = ports

    def _choose_new_ports(self) -> bool:
        if self._http_port_given:
            return False  # the caller's HTTP port may be the one taken; retrying would not help
        self.http_port = free_port()
        self._assign_other_ports()
        return True

    def _command(self) -> list[str]:
        self.node_name = f"modelgrid-{os.getpid()}-{self.http_port}"
        options = {
            "-client": LOOPBACK,
            "-bind": LOOPBACK,
            "-node": self.node_name,
            "-http-port": str(self.http_port),
            "-dns-port": str(self.dns_port),
            "-serf-lan-port": str(self.serf_lan_port),
            "-serf-wan-port": str(self.serf_wan_port),
            "-server-port": str(self.server_port),
            "-grpc-port": "-1",  # -dev would otherwise bind 8502 (Envoy xDS, unused here)
            "-hcl": "disable_update_check = true",  # no calls to checkpoint-api.hashicorp.com
            "-config-file": str(self.config_file),
        }
        return [consul_binary(), "agent", "-dev", *_flatten(options)]

    def _answers(self) -> bool:
        """A leader is elected and the ACL system knows the master token."""
        return bool(consul_leader(self.http_addr)) and ConsulAcl(self.http_url, self.master_token).master_accepted()


class RedisServer(_LoopbackProcess):
    """A real Debian `redis-server` on loopback with its own data dir, AOF on and RDB snapshots off, that requires a
    password: the one given, else the one kept in <state dir>/redis-password, else a new random one. Each start
    writes it there (mode 0600), so a later RedisServer on the same state dir (`make up` again, `status`,
    scripts/mesh.py) uses the same one; `.url` carries it.

    `replica_of`: the port of a primary on loopback that this server replicates (`replicaof`), with the same
    password (`masterauth`); with a RedisSentinel watching them, either may become the primary after a fail-over.
    """

    name = "redis"

    def __init__(
        self,
        state_dir: Path | str,
        *,
        port: int | None = None,
        detached: bool = False,
        appendfsync: str = "everysec",
        password: str | None = None,
        replica_of: int | None = None,
    ) -> None:
        super().__init__(state_dir, detached=detached)
        self.replica_of = replica_of
        self.data_dir = self.state_dir / "redis-data"
        self.password_file = self.state_dir / REDIS_PASSWORD_FILE
        if password == "":
            raise InfraError("an empty Redis password would leave Redis without one")
        self.password = password if password is not None else self._kept_or_new_password()
        # The password goes to redis-server in a config file of mode 0600: on a command line `ps` would show it.
        self._auth_config = self.state_dir / "redis-auth.conf"
        # "everysec" (the default, as in production) may lose the last second of writes on a host crash, and a
        # reply can precede its AOF write while a slow fsync is pending; "always" writes and syncs before replying.
        self.appendfsync = appendfsync
        self._port_given = port is not None
        self.port = port if port is not None else free_port()

    @property
    def url(self) -> str:
        """Client URL with the password, e.g. "redis://:PASSWORD@127.0.0.1:6379/0": a secret, so log it only through
        kit.redis_auth.redacted_url."""
        return url_with_password(f"redis://{LOOPBACK}:{self.port}/0", self.password)

    def restart(self) -> None:
        """Stop (SIGTERM, so the AOF is flushed) and start again on the same port, data dir and password."""
        self.stop()
        self.start()

    def start(self) -> None:
        """Keep the password in the state dir, launch redis-server and block until it answers PING with it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_password_file(self.password_file, self.password)
        write_redis_auth_config(self._auth_config, self.password)
        # A replica, or a primary that a fail-over makes a replica, authenticates to its primary with this password.
        with open(self._auth_config, "a", encoding="utf-8") as config:
            config.write(requirepass_directive(self.password).replace("requirepass", "masterauth", 1))
        super().start()
        self._port_given = True  # clients hold this port now: a restart never moves it

    def _choose_new_ports(self) -> bool:
        if self._port_given:
            return False
        self.port = free_port()
        return True

    def _command(self) -> list[str]:
        options = {
            "--port": str(self.port),
            "--bind": LOOPBACK,
            "--dir": str(self.data_dir),
            "--appendonly": "yes",
            "--appendfsync": self.appendfsync,
            "--save": "",  # no RDB snapshots: the AOF is the only persistence
            "--daemonize": "no",
            "--protected-mode": "yes",
            "--logfile": str(self.log_path),
            # A new replica gets its full copy at once (Redis waits 5 s for more replicas to share one by default).
            "--repl-diskless-sync-delay": "0",
        }
        if self.replica_of is not None:
            options["--replicaof"] = f"{LOOPBACK} {self.replica_of}"
        return [redis_binary(), str(self._auth_config), *_flatten(options)]  # a config file comes first

    def _answers(self) -> bool:
        return redis_ping(LOOPBACK, self.port, password=self.password)

    def _kept_or_new_password(self) -> str:
        if not self.password_file.exists():
            return generate_password()
        try:
            return read_password_file(self.password_file)
        except RedisPasswordError as exc:
            raise InfraError(str(exc)) from None


class RedisSentinel(_LoopbackProcess):
    """A real Redis Sentinel (Debian's redis-sentinel) on loopback that monitors the primary at `primary_port` under
    `master` with `quorum`, authenticating to the Redis servers with `redis_password`; it requires `password` itself
    if one is given. `down_after_ms` and `failover_timeout_ms` are short by default, so that a fail-over takes a few
    seconds (tests); Sentinel's own defaults are 30 s and 3 min. Its configuration (mode 0600: it holds passwords)
    is in its state dir, which Sentinel rewrites as it learns the other sentinels, the replicas and fail-overs.
    Give every sentinel its own state dir."""

    name = "sentinel"

    def __init__(
        self,
        state_dir: Path | str,
        *,
        primary_port: int,
        redis_password: str,
        master: str = "modelgrid",
        quorum: int = 2,
        password: str | None = None,
        port: int | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(state_dir)
        self.primary_port = primary_port
        self.redis_password = redis_password
        self.master = master
        self.quorum = quorum
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config_file = self.state_dir / "sentinel.conf"
        self._port_given = port is not None
        self.port = port if port is not None else free_port()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        super().start()
        self._port_given = True

    def _write_config(self) -> None:
        def quoted(value: str) -> str:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            "daemonize no",
            f"logfile {quoted(str(self.log_path))}",
            f"dir {quoted(str(self.state_dir))}",
            f"sentinel monitor {self.master} {LOOPBACK} {self.primary_port} {self.quorum}",
            f"sentinel auth-pass {self.master} {quoted(self.redis_password)}",
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.master} 1",
        ]
        if self.password is not None:
            # Sentinels talk to each other too: with a password of their own, each gives it to the others.
            lines += [f"requirepass {quoted(self.password)}", f"sentinel sentinel-pass {quoted(self.password)}"]
        write_private_file(self.config_file, "\n".join(lines) + "\n")

    def _choose_new_ports(self) -> bool:
        if self._port_given:
            return False
        self.port = free_port()
        return True

    def _command(self) -> list[str]:
        self._write_config()  # each launch: a port chosen again must be in it
        return [*sentinel_binary(), str(self.config_file)]

    def _answers(self) -> bool:
        return redis_ping(LOOPBACK, self.port, password=self.password)


# ---- command line: detached processes tracked by <state-dir>/<name>.pid and <name>.addr -------------------


def _read_record(state_dir: Path, name: str) -> tuple[int, str] | None:
    """(pid, address) from the state files of a detached process, None if there are none."""
    try:
        pid = int((state_dir / f"{name}.pid").read_text().strip())
        addr = (state_dir / f"{name}.addr").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid, addr


def _write_record(state_dir: Path, name: str, pid: int, addr: str) -> None:
    (state_dir / f"{name}.pid").write_text(f"{pid}\n")
    (state_dir / f"{name}.addr").write_text(f"{addr}\n")


def _remove_record(state_dir: Path, name: str) -> None:
    for suffix in ("pid", "addr"):
        (state_dir / f"{name}.{suffix}").unlink(missing_ok=True)


def _is_our_process(pid: int, name: str) -> bool:
    """True if pid is alive and runs the expected binary (guards against a reused pid)."""
    expected = "consul" if name == "consul" else "redis-server"
    try:
        return pid_alive(pid) and Path(f"/proc/{pid}/comm").read_text().strip() == expected
    except OSError:
        return False


def _answers(name: str, addr: str, state_dir: Path) -> bool:
    if name == "consul":
        return bool(consul_leader(addr))
    host, port = addr.rsplit(":", 1)
    return redis_ping(host, int(port), password=_kept_redis_password(state_dir))


def _kept_redis_password(state_dir: Path) -> str | None:
    """The password of the state dir's Redis, None if none is kept there (that Redis does not answer then)."""
    try:
        return read_password_file(state_dir / REDIS_PASSWORD_FILE)
    except RedisPasswordError:
        return None


def _terminate_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a process that is not our child, wait for it to go, SIGKILL after timeout."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            logger.warning("pid %s ignored SIGTERM for %ss, killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def _running_record(state_dir: Path, name: str) -> tuple[int, str] | None:
    record = _read_record(state_dir, name)
    if record is None or not _is_our_process(record[0], name):
        return None
    return record


def _up_one(process: ConsulAgent | RedisServer, addr: str) -> None:
    state_dir, name = process.state_dir, process.name
    record = _running_record(state_dir, name)
    if record is not None:
        pid, running_addr = record
        if not _answers(name, running_addr, state_dir):
            # Redis: also one started without the password kept in the state dir (before Redis had one).
            how = f" with the password in {state_dir / REDIS_PASSWORD_FILE}" if name == "redis" else ""
            raise InfraError(f"{name} pid {pid} runs but does not answer at {running_addr}{how}: run `down` first")
        print(f"{name}: already running at {running_addr} (pid {pid})")
        return
    _remove_record(state_dir, name)
    process.start()
    assert process.pid is not None
    _write_record(state_dir, name, process.pid, addr)
    print(f"{name}: started at {addr} (pid {process.pid}, log {process.log_path})")


def service_token(consul_url: str, service: str) -> str:
    """The ACL token of the modelgrid service `service` in the Consul agent at consul_url, for a launcher that knows
    only the URL: made by the ConsulAgent of this process that runs there (so that it is made again when that agent
    restarts), else with the master token in $CONSUL_HTTP_TOKEN (which a test session gives all its agents)."""
    agent = ConsulAgent._started.get(consul_url.rstrip("/"))
    if agent is not None and agent.pid is not None:
        return agent.token_for(service)
    master = os.environ.get(TOKEN_ENV, "").strip()
    if not master:
        raise InfraError(f"no ConsulAgent of this process runs at {consul_url}, and ${TOKEN_ENV} is not set")
    return ConsulAcl(consul_url, master).token_for(service)


def cmd_up(state_dir: Path, consul_port: int, redis_port: int) -> None:
    """Make the mesh's certificates if missing, then start Consul and Redis detached, unless they already run and
    answer."""
    tls_dir = tls.init(state_dir / TLS_DIR)
    print(f"internal mTLS: CA and certificates in {tls_dir} (keys mode 0600)")
    consul = ConsulAgent(state_dir, http_port=consul_port, detached=True, tls_dir=tls_dir)
    _up_one(consul, consul.http_addr)
    print(f"consul: ACLs on (default deny), master token in {consul.master_token_file} (mode 0600)")
    redis = RedisServer(state_dir, port=redis_port, detached=True)
    _up_one(redis, f"{LOOPBACK}:{redis.port}")
    cmd_status(state_dir)


def cmd_down(state_dir: Path) -> None:
    """Stop the detached Consul and Redis (SIGTERM, wait) and remove their pid records. Redis's data and password
    stay in the state dir for the next `up`."""
    for name in ("redis", "consul"):
        record = _running_record(state_dir, name)
        if record is None:
            print(f"{name}: not running")
        else:
            _terminate_pid(record[0])
            print(f"{name}: stopped (pid {record[0]})")
        _remove_record(state_dir, name)


def cmd_status(state_dir: Path) -> bool:
    """Print what runs; True if both run and answer."""
    healthy = True
    for name in ("consul", "redis"):
        record = _running_record(state_dir, name)
        if record is None:
            print(f"{name}: not running")
            healthy = False
            continue
        pid, addr = record
        answers = _answers(name, addr, state_dir)
        healthy = healthy and answers
        url = f"http://{addr}" if name == "consul" else f"redis://{addr}/0"
        secret = f" (password in {state_dir / REDIS_PASSWORD_FILE})" if name == "redis" else ""
        print(f"{name}: {url}{secret} pid {pid} {'answers' if answers else 'NOT ANSWERING'}")
    return healthy


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m services.kit.localinfra`."""
    parser = argparse.ArgumentParser(prog="python -m services.kit.localinfra", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=Path(".run"), help="pid files, logs, Redis data")
    parser.add_argument("--consul-port", type=int, default=8500, help="Consul HTTP port for `up`")
    parser.add_argument("--redis-port", type=int, default=6379, help="Redis port for `up`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    state_dir = args.state_dir.resolve()
    try:
        if args.command == "up":
            state_dir.mkdir(parents=True, exist_ok=True)
            cmd_up(state_dir, args.consul_port, args.redis_port)
        elif args.command == "down":
            cmd_down(state_dir)
        else:
            return 0 if cmd_status(state_dir) else 1
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
