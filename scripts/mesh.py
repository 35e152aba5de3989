"""Starts, stops and reports the modelgrid services of a local mesh (`make up` / `make down` / `make status`).

Each service runs detached as `python -m <module>`, its pid and log in the state dir. `up` waits until every
service is SERVING and passing in Consul, and is idempotent: a service that already runs is left alone.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit import tls
from services.kit.consul_acl import TOKEN_ENV, TOKEN_HEADER, ConsulAcl, read_token_file
from services.kit.localinfra import CONSUL_MASTER_TOKEN_FILE, CONSUL_TOKEN_DIR, REDIS_PASSWORD_FILE, TLS_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSUL_URL = os.environ.get("MODELGRID_CONSUL_URL", "http://127.0.0.1:8500")
# Each service's settings prefix: its Consul ACL token file is given as <prefix>CONSUL_TOKEN_FILE.
ENV_PREFIXES = {
    "services.registry": "MODELGRID_REGISTRY_",
    "services.predictor": "MODELGRID_PREDICTOR_",
    "services.trainer.agent": "MODELGRID_AGENT_",
    "services.trainer": "MODELGRID_TRAINER_",
    "services.gateway": "MODELGRID_GATEWAY_",
}


@dataclass
class LocalService:
    """One process of the mesh: a name (also its pid/log file), its module, its port and its settings."""

    name: str
    module: str
    consul_name: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = -1
    """Its Prometheus /metrics port (deploy/prometheus/prometheus.yml scrapes these)."""


def mesh(state_dir: Path) -> list[LocalService]:
    """The services `make up` runs, in start order."""
    # Redis requires the password `localinfra up` keeps in the state dir (mode 0600); every service but the agents
    # (which keep nothing in Redis) reads it from there, so it is in no environment or command line.
    redis_password_file = str(state_dir / REDIS_PASSWORD_FILE)
    return [
        LocalService(
            "registry",
            "services.registry",
            "registry",
            50051,
            {
                "MODELGRID_REGISTRY_PORT": "50051",
                "MODELGRID_REGISTRY_METRICS_PORT": "9151",
                "MODELGRID_REGISTRY_BLOB_DIR": str(state_dir / "registry" / "blobs"),
                "MODELGRID_REGISTRY_REDIS_PASSWORD_FILE": redis_password_file,
            },
            9151,
        ),
        *(
            LocalService(
                f"predictor-{i}",
                "services.predictor",
                "predictor",
                50060 + i,
                {
                    "MODELGRID_PREDICTOR_PORT": str(50060 + i),
                    "MODELGRID_PREDICTOR_METRICS_PORT": str(9160 + i),
                    "MODELGRID_PREDICTOR_AUTO_LOAD": "true",
                    "MODELGRID_PREDICTOR_CACHE_DIR": str(state_dir / f"predictor-{i}" / "cache"),
                    "MODELGRID_PREDICTOR_REDIS_PASSWORD_FILE": redis_password_file,
                },
                9160 + i,
            )
            for i in (1, 2)
        ),
        # Worker agents: one slot each (a TensorFlow worker per core on a two-core host). Each reserves the TF
        # collective ports of its workers on 127.0.0.1, where the other agent's workers reach them.
        *(
            LocalService(
                f"agent-{i}",
                "services.trainer.agent",
                "trainer-agent",
                50070 + i,
                {
                    "MODELGRID_AGENT_PORT": str(50070 + i),
                    "MODELGRID_AGENT_METRICS_PORT": str(9170 + i),
                    "MODELGRID_AGENT_SLOTS": "1",
                    "MODELGRID_AGENT_WORK_DIR": str(state_dir / f"agent-{i}"),
                },
                9170 + i,
            )
            for i in (1, 2)
        ),
        # Last: it needs the registry (to register models) and finds the agents in Consul. Data sets, checkpoints
        # and exports move between it and the agents as registry blobs; its scratch dir is its own.
        LocalService(
            "trainer",
            "services.trainer",
            "trainer",
            50081,
            {
                "MODELGRID_TRAINER_PORT": "50081",
                "MODELGRID_TRAINER_METRICS_PORT": "9181",
                "MODELGRID_TRAINER_SCRATCH_DIR": str(state_dir / "trainer" / "scratch"),
                "MODELGRID_TRAINER_RECIPES_DIR": str(REPO_ROOT / "services" / "trainer" / "recipes"),
                "MODELGRID_TRAINER_REDIS_PASSWORD_FILE": redis_password_file,
            },
            9181,
        ),
        # The public door: native gRPC on 8080, gRPC-Web and the console on 8081, metrics on 9180.
        LocalService(
            "gateway",
            "services.gateway",
            "gateway",
            8080,
            {
                "MODELGRID_GATEWAY_PORT": "8080",
                "MODELGRID_GATEWAY_WEB_PORT": "8081",
                "MODELGRID_GATEWAY_METRICS_PORT": "9180",
                "MODELGRID_GATEWAY_WEB_DIR": str(REPO_ROOT / "web" / "dist"),
                # Auth is on: the gateway makes its admin key here (mode 0600) on its first start.
                "MODELGRID_GATEWAY_ADMIN_KEY_FILE": str(state_dir / "gateway" / "admin-key"),
                "MODELGRID_GATEWAY_REDIS_PASSWORD_FILE": redis_password_file,
            },
            9180,
        ),
    ]


def _pid(state_dir: Path, name: str) -> int | None:
    try:
        pid = int((state_dir / f"{name}.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def _serving(state_dir: Path, service: LocalService) -> bool:
    """SERVING on its health endpoint: asked over mTLS as `operator`, except the gateway's public port."""
    internal = None if service.module == "services.gateway" else tls.InternalTLS(state_dir / TLS_DIR, "operator")
    with tls.dial(f"127.0.0.1:{service.port}", service.consul_name, internal) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _master_token(state_dir: Path) -> str:
    """The Consul master token: $CONSUL_HTTP_TOKEN, else the one `localinfra up` kept in the state dir."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    try:
        return read_token_file(state_dir / CONSUL_MASTER_TOKEN_FILE)
    except RuntimeError as exc:
        sys.exit(f"{exc}: start Consul with `python -m services.kit.localinfra up`, or set ${TOKEN_ENV}")


def _passing_in_consul(consul_name: str, port: int, token: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{CONSUL_URL}/v1/health/service/{consul_name}?passing=true")
    request.add_header(TOKEN_HEADER, token)  # with default-deny ACLs, an anonymous query sees no instance
    try:
        with opener.open(request, timeout=2) as response:
            return any(entry["Service"]["Port"] == port for entry in json.load(response))
    except OSError:
        return False


def up(state_dir: Path, timeout: float = 120.0) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    master_token = _master_token(state_dir)
    # Each service gets a Consul ACL token of its own (it may register under its own name only), in a file of mode
    # 0600 that localinfra makes again in Consul when Consul restarts.
    acl = ConsulAcl(CONSUL_URL, master_token, token_dir=state_dir / CONSUL_TOKEN_DIR)
    # The services use their own token, never an operator's $CONSUL_HTTP_TOKEN.
    base_env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    for service in mesh(state_dir):
        token_file = acl.token_file(service.consul_name)
        if _pid(state_dir, service.name):
            # Left alone. After a Consul restart it registers again by itself within seconds: wait for that, so
            # that `make up` returns with the mesh whole.
            deadline = time.monotonic() + 30
            while not _passing_in_consul(service.consul_name, service.port, master_token):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            if not _passing_in_consul(service.consul_name, service.port, master_token):
                sys.exit(f"{service.name} runs but is not passing in Consul; see {state_dir / service.name}.log")
            print(f"{service.name}: already running on 127.0.0.1:{service.port}, passing in Consul")
            continue
        with (state_dir / f"{service.name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", service.module],
                cwd=REPO_ROOT,
                env={
                    **base_env,
                    **service.env,
                    f"{ENV_PREFIXES[service.module]}CONSUL_TOKEN_FILE": str(token_file),
                    # mTLS among the services with the certificates `localinfra up` made
                    f"{ENV_PREFIXES[service.module]}INTERNAL_TLS_DIR": str(state_dir / TLS_DIR),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (state_dir / f"{service.name}.pid").write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        while not (
            _serving(state_dir, service) and _passing_in_consul(service.consul_name, service.port, master_token)
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                log_tail = (state_dir / f"{service.name}.log").read_text()[-2000:]
                sys.exit(f"{service.name} did not start; see {state_dir / service.name}.log:\n{log_tail}")
            time.sleep(0.3)
        print(f"{service.name}: serving on 127.0.0.1:{service.port}, passing in Consul (pid {process.pid})")


def print_addresses(state_dir: Path) -> None:
    key_file = state_dir / "gateway" / "admin-key"
    consul_token_file = state_dir / CONSUL_MASTER_TOKEN_FILE
    print(
        "\nmodelgrid is up. The public door is the gateway, which takes API keys only:\n"
        "  gRPC (programs, modelgrid CLI):  127.0.0.1:8080   e.g. .venv/bin/modelgrid models list\n"
        "  web console and gRPC-Web:        http://127.0.0.1:8081/\n"
        f"  Consul UI:                       http://127.0.0.1:8500/ui (its ACL token: {consul_token_file})\n"
        "  metrics:                         gateway :9180, predictors :9161 and :9162\n"
        f"The admin API key is in {key_file} (mode 0600). The modelgrid CLI of this checkout uses it for\n"
        "127.0.0.1:8080; programs send it as `authorization: Bearer <key>`; in the console, paste it into the key\n"
        "field (kept for that tab only). Make keys with fewer rights with GatewayAdmin.CreateApiKey.\n"
        "Stop it with `make down`."
    )


def down(state_dir: Path) -> None:
    for service in reversed(mesh(state_dir)):
        pid = _pid(state_dir, service.name)
        if pid:
            os.kill(pid, signal.SIGTERM)
            for _ in range(150):
                if not _pid(state_dir, service.name):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
            print(f"{service.name}: stopped")
        (state_dir / f"{service.name}.pid").unlink(missing_ok=True)


def status(state_dir: Path) -> bool:
    healthy = True
    for service in mesh(state_dir):
        pid = _pid(state_dir, service.name)
        ok = bool(pid) and _serving(state_dir, service)
        healthy &= ok
        print(
            f"{service.name}: {'serving' if ok else 'down'} on 127.0.0.1:{service.port}"
            + (f" pid {pid}" if pid else "")
        )
    return healthy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".run")
    args = parser.parse_args()
    state_dir = args.state_dir.resolve()
    if args.command == "up":
        up(state_dir)
        print_addresses(state_dir)
    elif args.command == "down":
        down(state_dir)
    else:
        sys.exit(0 if status(state_dir) else 1)


if __name__ == "__main__":
    main()
