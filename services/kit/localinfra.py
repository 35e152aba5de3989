"""Start and stop a real Consul dev agent and a real Redis server on loopback, for `make up` and for tests.

Library use (tests; every port is free and chosen, so parallel runs never collide)::

    with ConsulAgent(tmp_path / "consul") as consul, RedisServer(tmp_path / "redis") as redis:
        ...  # consul.http_url, redis.url

Command line (`make up`; the processes keep running after the command exits)::

    python -m services.kit.localinfra up --state-dir .run [--consul-port 8500] [--redis-port 6379]
    python -m services.kit.localinfra status --state-dir .run
    python -m services.kit.localinfra down --state-dir .run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CONSUL_BINARY = REPO_ROOT / ".tools" / "consul" / "usr" / "bin" / "consul"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20
# Loopback requests must never go through an HTTP proxy configured in the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class InfraError(RuntimeError):
    """A local infrastructure process is missing, failed to start, or does not answer."""


class _PortInUse(InfraError):
    """The process exited at start because one of its ports was taken meanwhile."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (held open together while chosen, so
    none repeats), none of them in `exclude`."""
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
            if port not in exclude:
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


def _executable(path: str, variable: str) -> str:
    if not os.access(path, os.X_OK):
        raise InfraError(f"${variable} points at {path}, which is not an executable file")
    return path


def consul_leader(http_addr: str, timeout: float = 1.0) -> str:
    """Return the Raft leader address the agent at http_addr reports, or "" if it has none or is down."""
    try:
        with _NO_PROXY_OPENER.open(f"http://{http_addr}/v1/status/leader", timeout=timeout) as response:
            return str(json.load(response))
    except (OSError, ValueError):
        return ""


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if the Redis server at host:port answers PING with PONG (raw RESP, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


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
    """A real `consul agent -dev` (in-memory server, its own leader) with every port on loopback chosen."""

    name = "consul"

    def __init__(self, state_dir: Path | str, *, http_port: int | None = None, detached: bool = False) -> None:
        super().__init__(state_dir, detached=detached)
        self._http_port_given = http_port is not None
        self.http_port = http_port if http_port is not None else free_port()
        self._assign_other_ports()

    @property
    def http_addr(self) -> str:
        """HTTP API address, e.g. "127.0.0.1:8500"."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def http_url(self) -> str:
        """HTTP API base URL, e.g. "http://127.0.0.1:8500"."""
        return f"http://{self.http_addr}"

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
        options = {
            "-client": LOOPBACK,
            "-bind": LOOPBACK,
            "-node": f"modelgrid-{os.getpid()}-{self.http_port}",
            "-http-port": str(self.http_port),
            "-dns-port": str(self.dns_port),
            "-serf-lan-port": str(self.serf_lan_port),
            "-serf-wan-port": str(self.serf_wan_port),
            "-server-port": str(self.server_port),
            "-grpc-port": "-1",  # -dev would otherwise bind 8502 (Envoy xDS, unused here)
            "-hcl": "disable_update_check = true",  # no calls to checkpoint-api.hashicorp.com
        }
        return [consul_binary(), "agent", "-dev", *_flatten(options)]

    def _answers(self) -> bool:
        return bool(consul_leader(self.http_addr))


class RedisServer(_LoopbackProcess):
    """A real Debian `redis-server` on loopback with its own data dir, AOF on and RDB snapshots off."""

    name = "redis"

    def __init__(
        self,
        state_dir: Path | str,
        *,
        port: int | None = None,
        detached: bool = False,
        appendfsync: str = "everysec",
    ) -> None:
        super().__init__(state_dir, detached=detached)
        self.data_dir = self.state_dir / "redis-data"
        # "everysec" (the default, as in production) may lose the last second of writes on a host crash, and a
        # reply can precede its AOF write while a slow fsync is pending; "always" writes and syncs before replying.
        self.appendfsync = appendfsync
        self._port_given = port is not None
        self.port = port if port is not None else free_port()

    @property
    def url(self) -> str:
        """Client URL, e.g. "redis://127.0.0.1:6379/0"."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def restart(self) -> None:
        """Stop (SIGTERM, so the AOF is flushed) and start again on the same port and data dir."""
        self.stop()
        self.start()

    def start(self) -> None:
        """Launch redis-server and block until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
        }
        return [redis_binary(), *_flatten(options)]

    def _answers(self) -> bool:
        return redis_ping(LOOPBACK, self.port)


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


def _answers(name: str, addr: str) -> bool:
    if name == "consul":
        return bool(consul_leader(addr))
    host, port = addr.rsplit(":", 1)
    return redis_ping(host, int(port))


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
        if not _answers(name, running_addr):
            raise InfraError(f"{name} pid {pid} runs but does not answer at {running_addr}: run `down` first")
        print(f"{name}: already running at {running_addr} (pid {pid})")
        return
    _remove_record(state_dir, name)
    process.start()
    assert process.pid is not None
    _write_record(state_dir, name, process.pid, addr)
    print(f"{name}: started at {addr} (pid {process.pid}, log {process.log_path})")


def cmd_up(state_dir: Path, consul_port: int, redis_port: int) -> None:
    """Start Consul and Redis detached, unless they already run and answer."""
    consul = ConsulAgent(state_dir, http_port=consul_port, detached=True)
    _up_one(consul, consul.http_addr)
    redis = RedisServer(state_dir, port=redis_port, detached=True)
    _up_one(redis, f"{LOOPBACK}:{redis.port}")
    cmd_status(state_dir)


def cmd_down(state_dir: Path) -> None:
    """Stop the detached Consul and Redis (SIGTERM, wait) and remove their state files."""
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
        answers = _answers(name, addr)
        healthy = healthy and answers
        url = f"http://{addr}" if name == "consul" else f"redis://{addr}/0"
        print(f"{name}: {url} pid {pid} {'answers' if answers else 'NOT ANSWERING'}")
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
