"""A replica of several serving processes on one port, so that one replica uses every core it may use.

One Python process handles every gRPC message on one thread, so it uses a little more than one core however many
the host has. A replica with `processes` > 1 is a small supervisor (no TensorFlow, no models) and that many worker
processes of the same service:

* the supervisor reserves the port with SO_REUSEPORT and every worker binds it too (gRPC sets SO_REUSEPORT on its
  listening sockets): the kernel spreads new connections over the workers that listen. A worker binds the port only
  once it can answer (its models loaded), so no connection reaches a worker that would refuse its calls;
* every worker also listens on a Unix socket of its own (`control_socket`, in a 0700 directory): the supervisor
  watches it there, and a worker sends calls that must reach every process (loading or unloading a model) to its
  siblings there;
* the supervisor is the one Consul registration of the replica: its own small gRPC server answers Consul's health
  check (SERVING once every worker has served; it stays SERVING while at least one does, e.g. while a crashed
  worker restarts), and the tags are what every serving worker publishes (`tags_of`);
* a worker that exits is started again (with backoff), given what its siblings serve (`restart_env`);
* SIGTERM stops the registration first, then the workers (each drains its calls), then the supervisor. Workers die
  with their supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no process behind.

Workers are `python -m <module>` with the supervisor's environment plus the settings it sets for them: the shared
port, `processes=1`, `worker_index`, `control_socket`, the replica's instance id, no Consul registration and a
metrics port of their own on a free port. The supervisor serves the replica's /metrics on `metrics_port`: every
worker's series, each with a `worker` label (`sum without (worker)` gives the replica's).
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Metric, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from services.kit.hostaddr import resolve_addresses
from services.kit.localinfra import NO_PROXY_OPENER, free_port
from services.kit.server import GrpcService, ServiceSpec, until_signal
from services.kit.settings import ReplicaSettings
from services.kit.streams import Backoff
from services.kit.telemetry import setup_tracing

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often the supervisor asks every worker whether it serves (and what, for the tags)."""
CHECK_TIMEOUT_SECONDS = 2.0
METRICS_TIMEOUT_SECONDS = 2.0
PR_SET_PDEATHSIG = 1

TagsOf = Callable[[grpc.aio.Channel], Awaitable[frozenset[str]]]
"""What a serving worker publishes in Consul, asked over its control socket."""
RestartEnv = Callable[[grpc.aio.Channel], Awaitable[dict[str, str]]]
"""Settings (without prefix) for a worker that starts again, asked from a serving sibling: what it should serve."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on host:port: keeps the port for the replica while workers
    start and restart. Only listening sockets take connections, so it never takes one itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def die_with_supervisor() -> None:
    """Called by a worker as it starts: SIGTERM when its supervisor dies, however it dies (and at once if it is
    already gone)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Worker:
    index: int
    socket: Path
    process: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None
    serving: bool = False
    tags: frozenset[str] = frozenset()
    started_at: float = 0.0
    metrics_port: int = -1
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=1.0, maximum=30.0))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None


class Supervisor:
    """Runs a replica's worker processes and its one Consul registration (see the module docstring)."""

    def __init__(
        self,
        settings: ReplicaSettings,
        *,
        module: str,
        env_prefix: str,
        name: str,
        version: str,
        tags_of: TagsOf | None = None,
        restart_env: RestartEnv | None = None,
        public: bool = False,
        worker_settings: dict[str, str] | None = None,
    ) -> None:
        """`public`: the service faces clients (the gateway): its health endpoint takes the public certificate's
        TLS, like its port, rather than internal mTLS. `worker_settings` (without prefix) go to every worker."""
        self.settings = settings
        self._worker_settings = dict(worker_settings or {})
        self._public = public
        self._module = module
        self._prefix = env_prefix
        self._name = name
        self._version = version
        self._tags_of = tags_of
        self._restart_env = restart_env
        self.count = settings.process_count()
        self.workers: list[Worker] = []
        self.port = 0
        self.check: GrpcService | None = None
        self._reserved: list[socket.socket] = []
        self._dir: tempfile.TemporaryDirectory | None = None
        self._monitor: asyncio.Task | None = None
        self._metrics_server = None
        self._stopping = False
        self._all_served = False
        self._published: frozenset[str] | None = None
        self._shared: dict[str, int] = {}
        self.extra_ports: dict[str, int] = {}
        """Other ports the workers share (setting name -> bound port), reserved like the main one."""

    def share_port(self, setting: str, port: int) -> None:
        """One more port every worker binds with SO_REUSEPORT (e.g. the gateway's web port; 0: a free one), reserved
        like the main one when the replica starts and given to the workers as `setting`. Call before start()."""
        self._shared[setting] = port

    async def start(self) -> None:
        """Reserves the port, starts the health server and its Consul registration, and spawns the workers. The
        replica turns SERVING once every worker serves."""
        settings = self.settings
        await resolve_addresses(settings)
        sock = reserve_port(settings.host, settings.port)
        self._reserved.append(sock)
        self.port = sock.getsockname()[1]
        for setting, port in self._shared.items():
            shared = reserve_port(settings.host, port)
            self._reserved.append(shared)
            self.extra_ports[setting] = shared.getsockname()[1]
        self._dir = tempfile.TemporaryDirectory(prefix=f"modelgrid-{self._name}-")
        os.chmod(self._dir.name, 0o700)  # the control sockets: only this user reaches them
        check_settings = settings.model_copy(update={"port": settings.supervisor_port})
        provider = setup_tracing(self._name, self._version, check_settings)
        spec = ServiceSpec(self._name, self._version, [], lambda server: None, public=self._public)
        self.check = GrpcService(spec, check_settings, provider, service_port=self.port)
        await self.check.start()
        self.workers = [Worker(i, Path(self._dir.name) / f"worker-{i}.sock") for i in range(self.count)]
        metrics_port = getattr(settings, "metrics_port", -1)
        if metrics_port >= 0:
            for worker in self.workers:
                worker.metrics_port = free_port()
            registry = CollectorRegistry()
            registry.register(WorkerMetrics(settings.host, self.workers))
            server, _ = start_http_server(metrics_port, addr=settings.host, registry=registry)
            self._metrics_server = server
        for worker in self.workers:
            await self._spawn(worker, {})
        self._monitor = asyncio.create_task(self._watch(), name=f"{self._name}-supervisor")
        logger.info(
            "%s replica: %d processes on port %d, health for Consul on %d",
            self._name,
            self.count,
            self.port,
            self.check.port,
        )

    def _worker_env(self, worker: Worker, extra: dict[str, str]) -> dict[str, str]:
        settings = self.settings
        own = {
            "HOST": settings.host,
            "ADVERTISE_HOST": settings.advertise_host,
            "PORT": str(self.port),
            "PROCESSES": "1",
            "WORKER_INDEX": str(worker.index),
            "CONTROL_SOCKET": str(worker.socket),
            "INSTANCE_ID": self.check.instance_id if self.check else "",
            "CONSUL_ENABLED": "false",
            "METRICS_PORT": str(worker.metrics_port),
            **{key: str(port) for key, port in self.extra_ports.items()},
            **self._worker_settings,
            **extra,
        }
        return {**os.environ, **{f"{self._prefix}{key}": value for key, value in own.items()}}

    async def _spawn(self, worker: Worker, extra: dict[str, str]) -> None:
        worker.socket.unlink(missing_ok=True)
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self._module,
            env=self._worker_env(worker, extra),
        )
        worker.started_at = time.monotonic()
        worker.serving = False
        if worker.channel is not None:
            await worker.channel.close()
        worker.channel = grpc.aio.insecure_channel(f"unix:{worker.socket}")
        logger.info("%s worker %d started (pid %d)", self._name, worker.index, worker.process.pid)

    async def _watch(self) -> None:
        """Health and tags of every worker, restarts, and the replica's own health and registration."""
        restarting: dict[int, asyncio.Task] = {}
        while not self._stopping:
            for worker in self.workers:
                if worker.index in restarting:
                    continue
                if worker.process is not None and worker.process.returncode is not None:
                    worker.serving = False
                    restarting[worker.index] = asyncio.create_task(self._restart(worker))
                    restarting[worker.index].add_done_callback(lambda _, i=worker.index: restarting.pop(i, None))
                    continue
                await self._probe(worker)
            await self._publish()
            await asyncio.sleep(POLL_SECONDS)
        for task in restarting.values():
            task.cancel()

    async def _probe(self, worker: Worker) -> None:
        if not worker.socket.exists() or worker.channel is None:
            worker.serving = False
            return
        try:
            stub = health_pb2_grpc.HealthStub(worker.channel)
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_SECONDS)
            serving = answer.status == health_pb2.HealthCheckResponse.SERVING
            if serving and self._tags_of is not None:
                worker.tags = await self._tags_of(worker.channel)
            if serving and not worker.serving:
                worker.backoff.reset()
            worker.serving = serving
        except grpc.aio.AioRpcError:
            worker.serving = False

    async def _restart(self, worker: Worker) -> None:
        code = worker.process.returncode if worker.process else None
        delay = worker.backoff.next() if time.monotonic() - worker.started_at < 30 else 0.0
        logger.error(
            "%s worker %d (pid %s) exited with %s; starting it again in %.1fs",
            self._name,
            worker.index,
            worker.process.pid if worker.process else "?",
            code,
            delay,
        )
        await asyncio.sleep(delay)
        extra: dict[str, str] = {}
        sibling = next((w for w in self.workers if w.serving and w.channel is not None), None)
        if sibling is not None and self._restart_env is not None:
            try:
                extra = await self._restart_env(sibling.channel)
            except grpc.aio.AioRpcError as exc:
                logger.warning("could not ask worker %d what it serves: %s", sibling.index, exc.code().name)
        if not self._stopping:
            await self._spawn(worker, extra)

    async def _publish(self) -> None:
        serving = [w for w in self.workers if w.serving]
        self._all_served = self._all_served or len(serving) == len(self.workers)
        assert self.check is not None
        await self.check.set_serving(self._all_served and bool(serving))
        for worker in self.workers:
            await self.check.set_health(f"worker/{worker.index}", worker.serving)
        if self._tags_of is None or not serving:
            return
        tags = frozenset.intersection(*(w.tags for w in serving))  # only what every serving process can answer
        if tags != self._published:
            self._published = tags
            await self.check.update_registration(tags=sorted(tags))

    async def stop(self, grace: float | None = None) -> None:
        """Deregisters, stops the workers (SIGTERM, then SIGKILL after the grace period) and cleans up."""
        if self._stopping:
            return
        self._stopping = True
        if self.check is not None:
            await self.check.set_serving(False)
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        grace = self.settings.shutdown_grace_seconds + 10 if grace is None else grace
        running = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), grace)
        except TimeoutError:
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.gather(*(p.wait() for p in running))
        for worker in self.workers:
            if worker.channel is not None:
                await worker.channel.close()
        if self.check is not None:
            await self.check.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for sock in self._reserved:
            sock.close()
        if self._dir is not None:
            self._dir.cleanup()

    async def run_until_signal(self) -> None:
        await until_signal()
        await self.stop()


class WorkerMetrics:
    """A Prometheus collector of the workers' own /metrics, each series labelled with its worker's index; scraped
    when the replica's /metrics is (a worker that does not answer is left out of that scrape)."""

    def __init__(self, host: str, workers: list[Worker]) -> None:
        self._host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker in self._workers:
            if worker.pid is None:
                continue
            url = f"http://{self._host}:{worker.metrics_port}/metrics"
            try:
                with NO_PROXY_OPENER.open(url, timeout=METRICS_TIMEOUT_SECONDS) as answer:
                    text = answer.read().decode()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    labels = {**sample.labels, "worker": str(worker.index)}
                    merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from families.values()
