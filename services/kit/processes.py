"""Run a modelgrid service as a real subprocess on a free port and wait until it serves (tests, benches, scripts).

Usage::

    registry = ServiceProcess("services.registry", "MODELGRID_REGISTRY_", {"BLOB_DIR": "..."}, log_path).start()
    ...  # registry.target, registry.port, registry.env
    registry.stop()  # SIGTERM, then SIGKILL if it does not exit
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit import tls
from services.kit.consul_acl import TOKEN_ENV
from services.kit.localinfra import KERNEL_PORTS_ENV, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_serving(
    target: str,
    timeout: float = 60.0,
    service: str = "",
    process: subprocess.Popen | None = None,
    root_certificates: bytes | None = None,
    channel: grpc.Channel | None = None,
) -> None:
    """Waits until the gRPC health endpoint at `target` says SERVING (fails early if `process` exits). With
    `root_certificates` the port speaks TLS and its certificate must be signed by them; `channel` (closed here)
    replaces both, e.g. an mTLS channel (kit.tls.dial)."""
    deadline = time.monotonic() + timeout
    if channel is None and root_certificates is None:
        channel = grpc.insecure_channel(target)
    elif channel is None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or (process is not None and process.poll() is not None):
                raise TimeoutError(f"{target} did not become SERVING within {timeout}s")
            time.sleep(0.1)


# The identity (kit.tls) each internal service's module serves as; the gateway's port is public (no mTLS).
INTERNAL_SERVICES = {
    "services.registry": "registry",
    "services.predictor": "predictor",
    "services.trainer": "trainer",
    "services.trainer.agent": "trainer-agent",
}


class ServiceProcess:
    """`python -m <module>` with settings from the environment, on a free port, logs in a file.

    `settings` are given without the prefix (`{"PORT": "0", "BLOB_DIR": ...}`); PORT defaults to a free port.
    `root_certificates`: the service's gRPC port speaks TLS with a certificate they sign (the gateway's public TLS).
    `internal_tls_dir`: the mesh's certificates (kit.tls): the service uses mTLS inside the mesh, and `channel()`
    calls it as `operator` (or another identity).
    """

    def __init__(
        self,
        module: str,
        env_prefix: str,
        settings: dict[str, str],
        log_path: Path,
        *,
        root_certificates: bytes | None = None,
        internal_tls_dir: Path | None = None,
    ) -> None:
        self.module = module
        self.root_certificates = root_certificates
        self.internal_tls_dir = internal_tls_dir
        if internal_tls_dir is not None:
            settings = {"INTERNAL_TLS_DIR": str(internal_tls_dir), **settings}
        # A predictor or gateway runs one process per core by default (kit.replica); here one, unless the caller asks.
        settings = {"PROCESSES": "1", **settings}
        self.port = int(settings.get("PORT", 0)) or free_port()
        self.env = {**os.environ, **{f"{env_prefix}{k}": str(v) for k, v in {**settings, "PORT": self.port}.items()}}
        self.env[KERNEL_PORTS_ENV] = "1"  # ports it picks itself must not be ones this process picked for others
        if "CONSUL_TOKEN" in settings or "CONSUL_TOKEN_FILE" in settings:
            # A service given its own Consul ACL token must not fall back to the caller's (often the master token).
            self.env.pop(TOKEN_ENV, None)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, *, identity: str = "operator", aio: bool = False, options: Sequence[tuple[str, object]] = ()):
        """A channel to this service as the caller would open it: mTLS as `identity` for an internal service with
        internal TLS, TLS for a gateway with a public certificate, plaintext otherwise (sync, or grpc.aio)."""
        service = INTERNAL_SERVICES.get(self.module)
        if service and self.internal_tls_dir is not None:
            return tls.dial(
                self.target, service, tls.InternalTLS(self.internal_tls_dir, identity), options=options, aio=aio
            )
        module = grpc.aio if aio else grpc
        if self.root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(self.root_certificates)
            return module.secure_channel(self.target, credentials, options=list(options))
        return module.insecure_channel(self.target, options=list(options))

    def start(self, timeout: float = 60.0) -> "ServiceProcess":
        """Starts the process and returns once it is SERVING (raises TimeoutError with its log tail if not)."""
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> "ServiceProcess":
        """Starts the process without waiting (several can then import and load side by side)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> "ServiceProcess":
        """Waits until the spawned process is SERVING; kills it and raises TimeoutError with its log tail if not."""
        try:
            wait_serving(self.target, timeout, process=self.process, channel=self.channel())
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"{self.module} did not start; log:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.running():
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL if it has not exited after 30 s; nothing if it is not running."""
        if self.running():
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
