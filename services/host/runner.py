"""Starts, stops and reports the modelgrid processes of one host from its description: the Consul agent, Redis
when the host runs it, then its services, each detached with its pid and log under the host's state dir.

`up` is idempotent (what runs is left alone) and returns when every service is SERVING and passing in the local
Consul agent; `down` stops everything in reverse order; `status` says what runs.

Consul runs with ACLs on (default deny). The agent gets them in a config file of mode 0600 (never on its command
line, where `ps` shows it): the cluster's master token on servers, and that token as the agent's token until the
ACLs are up; then `up` hands it a token of the agents' own (kit.consul_acl.AGENT, persisted in its data dir) and
makes each service a token of its own in <state_dir>/consul-tokens/<name> (mode 0600, its CONSUL_TOKEN_FILE). The
runner's own Consul calls (health, leader) send the master token.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.host.description import HostDescription, ServiceConfig
from services.kit import tls
from services.kit.consul_acl import (
    TOKEN_ENV,
    TOKEN_HEADER,
    AclSetupError,
    ConsulAcl,
    ConsulTokenError,
    read_token_file,
)
from services.kit.localinfra import CONSUL_TOKEN_DIR, consul_binary, pid_alive, redis_binary, redis_ping
from services.kit.private_files import write_private_file
from services.kit.redis_auth import (
    RedisPasswordError,
    ensure_password_file,
    read_password_file,
    write_redis_auth_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HostError(RuntimeError):
    """A process of the host did not start or does not answer; the message says where its log is."""


class HostRunner:
    """The processes of one host (see the module docstring)."""

    def __init__(self, host: HostDescription, *, timeout: float = 180.0) -> None:
        self.host = host
        self.timeout = timeout
        self.run_dir = host.state_dir / "run"
        self.consul_config_file = self.run_dir / "consul-acl.json"  # mode 0600: it holds the master token
        self.token_dir = host.state_dir / CONSUL_TOKEN_DIR  # each service's Consul ACL token, mode 0600
        self._redis_password: str | None = None
        self._tls: tls.InternalTLS | None = None
        self._master_token: str | None = None

    # -- up --------------------------------------------------------------------------------------------------

    def up(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._redis_password = self.redis_password()  # before anything starts: a missing file stops `up` at once
        self._tls = self.internal_tls()  # likewise the certificates
        self._master_token = self.consul_master_token()  # and Consul's master token
        self._write_consul_config()
        self._start("consul", self._consul_command(), {}, answers=self._consul_answers)
        self._wait(self._consul_has_leader, "the Consul cluster to elect a leader (start the other hosts' agents)")
        self._wait(
            self._consul_acl_ready,
            f"Consul's ACLs to accept the master token in {self.host.consul_master_token_file} (every host needs a"
            " copy of the same file; the servers' agents must have started with it)",
        )
        acl = self._consul_acl()
        self._acl_setup(acl.set_agent_token)  # the agent's own token replaces the master token it started with
        print(f"consul: ACLs on (default deny); the agent's and each service's token in {self.token_dir}")
        if self.host.redis_port is not None:
            self._start("redis", self._redis_command(), {}, answers=self._own_redis_answers)
        if any(_uses_redis(s) for s in self.host.services):
            self._wait(
                self._redis_answers,
                f"Redis at {self._redis_address()} to answer with the password in {self.host.redis_password_file}"
                " (start the host that runs it; every host needs a copy of its password file)",
            )
        for service in self.host.services:
            name = self._name(service)
            # Its own token, made once (or made again in Consul from the kept file); several hosts may make tokens
            # for the same service name at once: each keeps its own, under the one shared policy.
            self._acl_setup(lambda s=service: acl.token_file(s.consul_name))
            self._start(name, [sys.executable, "-m", service.module], self._service_env(service))
            self._wait(lambda s=service: self._serving(s) and self._passing(s), f"{name} to serve and pass in Consul")
            print(f"{name}: serving on {self.host.address}:{service.port}, passing in Consul")

    def _start(self, name: str, command: list[str], env: dict[str, str], answers=None) -> None:
        if (pid := self._pid(name)) is not None:
            print(f"{name}: already running (pid {pid})")
            return
        log = self.run_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                # Each service sends the token in its CONSUL_TOKEN_FILE, never an operator's $CONSUL_HTTP_TOKEN.
                env={**{k: v for k, v in os.environ.items() if k != TOKEN_ENV}, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.run_dir / f"{name}.pid").write_text(f"{process.pid}\n")
        if answers is not None:
            self._wait(answers, f"{name} to answer", process=process, log=log)
        print(f"{name}: started (pid {process.pid}, log {log})")

    def _wait(self, condition, what: str, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
        deadline = time.monotonic() + self.timeout
        while not condition():
            if process is not None and process.poll() is not None:
                raise HostError(f"{what}: it exited with {process.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise HostError(f"timed out after {self.timeout:.0f}s waiting for {what}; logs in {self.run_dir}")
            time.sleep(0.2)

    def redis_password(self) -> str | None:
        """The cluster's Redis password, from the host's redis_password_file. The host that runs Redis makes the file
        (a random password, mode 0600) if it is missing; the other hosts need a copy of it. None on a host none of
        whose services keeps state in Redis (worker agents only)."""
        path = self.host.redis_password_file
        if self.host.redis_port is None:
            if not any(_uses_redis(s) for s in self.host.services):
                return None
            try:
                return read_password_file(path)
            except RedisPasswordError as exc:
                raise HostError(f"{exc}; copy it (mode 0600) from the host that runs Redis") from None
        try:
            password, made = ensure_password_file(path)
        except RedisPasswordError as exc:
            raise HostError(str(exc)) from None
        except OSError as exc:
            raise HostError(f"cannot make the Redis password file {path}: {exc.strerror or exc}") from None
        if made:
            print(f"redis: made its password in {path} (mode 0600): copy that file to every other host")
        return password

    def consul_master_token(self) -> str:
        """The cluster's Consul master token, from the host's consul_master_token_file, which the operator makes
        once and copies to every host; HostError naming the command that makes it when it is missing."""
        path = self.host.consul_master_token_file
        try:
            return read_token_file(path)
        except ConsulTokenError as exc:
            raise HostError(
                f"{exc}; make the cluster's Consul master token once, before the first `up` of any host: "
                f'`(umask 077 && python3 -c "import uuid; print(uuid.uuid4())" > consul-master-token)`, and copy '
                f"that file (mode 0600) to {path} on every host"
            ) from None

    def internal_tls(self) -> tls.InternalTLS:
        """The mesh's certificates in the host's tls_dir, as `operator` (this runner's health checks); HostError
        naming the command that makes them when they are missing."""
        try:
            return tls.InternalTLS(self.host.tls_dir, "operator")
        except FileNotFoundError as exc:
            raise HostError(
                f"{exc}; make the certificates once (python -m services.kit.tls init DIR --ca-dir CA_DIR) and copy "
                f"DIR to {self.host.tls_dir} on every host"
            ) from None

    # -- the processes -----------------------------------------------------------------------------------------

    def _consul_acl_config(self) -> dict:
        """The agent's ACL configuration: default deny, the master token on servers, and the master token as its
        own token too until `up` gives it one of the agents' own (which it persists and prefers at its next start).
        Tokens persist in its data dir, so a restarted agent keeps the token `up` gave it."""
        token = self._token()
        tokens = {"master": token, "agent": token} if self.host.consul.server else {"agent": token}
        return {
            "acl": {
                "enabled": True,
                "default_policy": "deny",
                "down_policy": "extend-cache",
                "enable_token_persistence": True,
                "tokens": tokens,
            }
        }

    def _write_consul_config(self) -> None:
        """The ACL configuration in a file of mode 0600 (kit.private_files), which the agent reads
        with -config-file: the token stays off its command line."""
        write_private_file(self.consul_config_file, json.dumps(self._consul_acl_config(), indent=2) + "\n")

    def _consul_command(self) -> list[str]:
        consul, host = self.host.consul, self.host
        command = [
            consul_binary(),
            "agent",
            f"-config-file={self.consul_config_file}",
            f"-node={host.name}",
            f"-bind={host.address}",
            "-client=127.0.0.1",
            f"-http-port={consul.http_port}",
            f"-data-dir={host.state_dir / 'consul'}",
            "-grpc-port=-1",
            "-dns-port=-1",
            "-hcl=disable_update_check = true",
            "-hcl=leave_on_terminate = true",
            # The services accept only callers with a certificate of the mesh: the health checks present the
            # `consul` one, and send the name every certificate carries.
            f'-hcl=ca_file = "{host.tls_dir / "ca.pem"}"',
            f'-hcl=cert_file = "{host.tls_dir / "consul.pem"}"',
            f'-hcl=key_file = "{host.tls_dir / "consul-key.pem"}"',
            "-hcl=enable_agent_tls_for_checks = true",
            f'-hcl=server_name = "{tls.MESH_NAME}"',
            *(f"-retry-join={peer}" for peer in consul.retry_join),
            *(f"-hcl={line}" for line in consul.hcl),
        ]
        if consul.server:
            command += ["-server", f"-bootstrap-expect={consul.bootstrap_expect}", "-ui"]
        return command

    def _redis_command(self) -> list[str]:
        data = self.host.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        # The password goes to redis-server in a config file of mode 0600 (its first argument), not on the command
        # line, where `ps` would show it.
        auth_config = self.run_dir / "redis-auth.conf"
        assert self._redis_password is not None
        write_redis_auth_config(auth_config, self._redis_password)
        return [
            redis_binary(),
            str(auth_config),
            "--port",
            str(self.host.redis_port),
            "--bind",
            self.host.address,
            "127.0.0.1",
            # Every client must authenticate (requirepass), so protected mode lets the other hosts' services in.
            # Still, keep Redis's port reachable from the modelgrid hosts only.
            "--protected-mode",
            "yes",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
        ]

    def _service_env(self, service: ServiceConfig) -> dict[str, str]:
        """The service's settings: its host's address and agent, its own Consul token file (made by `up` before
        it starts), the shared secrets' files, its state dirs, then the description's settings."""
        state = self.host.state_dir
        per_kind = {
            "registry": {"BLOB_DIR": str(state / "registry" / "blobs")},
            "predictor": {"CACHE_DIR": str(state / "predictor" / "cache")},
            "agent": {"WORK_DIR": str(state / "agent")},
            "trainer": {
                "SCRATCH_DIR": str(state / "trainer"),
                "RECIPES_DIR": str(REPO_ROOT / "services" / "trainer" / "recipes"),
            },
            # Auth is on by default: the gateway makes its admin key in the host's state dir (mode 0600).
            "gateway": {
                "WEB_DIR": str(REPO_ROOT / "web" / "dist"),
                "ADMIN_KEY_FILE": str(state / "gateway" / "admin-key"),
            },
        }[service.kind]
        settings = {
            "PORT": str(service.port),
            "HOST": self.host.address,
            "ADVERTISE_HOST": self.host.address,
            "CONSUL_URL": self.host.consul.url,
            "CONSUL_TOKEN_FILE": str(self.token_dir / service.consul_name),
            "REDIS_URL": self.host.redis_url,
            "INTERNAL_TLS_DIR": str(self.host.tls_dir),
            **({"REDIS_PASSWORD_FILE": str(self.host.redis_password_file)} if _uses_redis(service) else {}),
            **per_kind,
            **service.settings,
        }
        return {f"{service.prefix}{key}": value for key, value in settings.items()}

    # -- checks ----------------------------------------------------------------------------------------------

    def _redis_address(self) -> str:
        parts = urlsplit(self.host.redis_url)
        return f"{parts.hostname}:{parts.port or 6379}"

    def _own_redis_answers(self) -> bool:
        return redis_ping(self.host.address, self.host.redis_port or 6379, password=self._redis_password)

    def _redis_answers(self) -> bool:
        parts = urlsplit(self.host.redis_url)
        return redis_ping(parts.hostname or "127.0.0.1", parts.port or 6379, password=self._redis_password)

    def _token(self) -> str:
        if self._master_token is None:
            self._master_token = self.consul_master_token()
        return self._master_token

    def _consul_get(self, path: str):
        """GET from the local agent with the master token: under default deny, an anonymous health query sees no
        instance."""
        request = urllib.request.Request(f"{self.host.consul.url}{path}")
        request.add_header(TOKEN_HEADER, self._token())
        with _NO_PROXY.open(request, timeout=2) as response:
            return json.load(response)

    def _consul_answers(self) -> bool:
        """The agent's HTTP API answers, with any status: until the cluster's ACLs are up (a leader is needed),
        Consul refuses even the master token."""
        try:
            self._consul_get("/v1/agent/self")
            return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            return False

    def _consul_acl(self) -> ConsulAcl:
        return ConsulAcl(self.host.consul.url, self._token(), token_dir=self.token_dir)

    def _consul_acl_ready(self) -> bool:
        """The cluster's ACLs are up and know the master token (just after a leader is elected)."""
        return ConsulAcl(self.host.consul.url, self._token()).master_accepted()

    def _acl_setup(self, step):
        """Runs an ACL administration step of ConsulAcl; its failure becomes a HostError (never naming a token)."""
        try:
            return step()
        except (AclSetupError, ConsulTokenError, OSError, ValueError) as exc:
            raise HostError(f"Consul ACL setup on {self.host.consul.url} failed: {exc}") from None

    def _consul_has_leader(self) -> bool:
        try:
            return bool(self._consul_get("/v1/status/leader"))
        except (OSError, ValueError):
            return False

    def _serving(self, service: ServiceConfig) -> bool:
        internal = None if service.kind == "gateway" else self._tls or self.internal_tls()
        with tls.dial(f"{self.host.address}:{service.port}", service.consul_name, internal) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _passing(self, service: ServiceConfig) -> bool:
        try:
            entries = self._consul_get(f"/v1/health/service/{service.consul_name}?passing=true")
        except (OSError, ValueError):
            return False
        return any(
            e["Service"]["Address"] == self.host.address and e["Service"]["Port"] == service.port for e in entries
        )

    # -- down and status ---------------------------------------------------------------------------------------

    def down(self) -> None:
        names = [self._name(s) for s in reversed(self.host.services)] + ["redis", "consul"]
        for name in names:
            pid = self._pid(name)
            if pid is not None:
                _terminate(pid)
                print(f"{name}: stopped (pid {pid})")
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)

    def status(self) -> bool:
        self._token()  # the health queries need the master token: without its file, say so first
        healthy = True
        names = ["consul", *(["redis"] if self.host.redis_port is not None else [])]
        for name in names:
            pid = self._pid(name)
            healthy &= pid is not None
            print(f"{name}: {'running, pid ' + str(pid) if pid else 'not running'}")
        for service in self.host.services:
            pid, name = self._pid(self._name(service)), self._name(service)
            ok = pid is not None and self._serving(service) and self._passing(service)
            healthy &= ok
            where = f"{self.host.address}:{service.port}"
            print(f"{name}: {'serving and passing' if ok else 'DOWN'} on {where}" + (f" pid {pid}" if pid else ""))
        return healthy

    def _name(self, service: ServiceConfig) -> str:
        return service.kind

    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None


def _uses_redis(service: ServiceConfig) -> bool:
    """Every service keeps its state in Redis but the worker agent."""
    return service.kind != "agent"


def _terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.1)
