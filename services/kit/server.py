"""The gRPC server runtime every service uses: build, register in Consul, serve, and shut down in order."""

import asyncio
import ipaddress
import logging
import random
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from services.kit import tls
from services.kit.consul import ConsulAclError, ConsulClient, Registration
from services.kit.hostaddr import resolve_addresses
from services.kit.interceptors import ErrorMappingInterceptor
from services.kit.metrics import MetricsEndpoint, RpcMetrics
from services.kit.settings import ServiceSettings
from services.kit.streams import Backoff
from services.kit.telemetry import server_interceptors

logger = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    """What a service is: its Consul name, version, the proto services it serves and how to add them."""

    name: str
    version: str
    proto_services: Sequence[str]
    add_servicers: Callable[[grpc.aio.Server], None]
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    public: bool = False
    """The gateway's port: clients are people and programs with API keys, so it serves the public certificate
    (tls_cert) if any, never internal mTLS."""
    callers: frozenset[str] = frozenset()
    """With internal TLS, the only identities that may call the service's methods (empty: any the CA signed).
    Without it (plaintext, loopback only) callers have no identity and this is not checked."""


KEEPALIVE_POLICY: list[tuple[str, int]] = [
    # Clients (kit.channels) ping every 2 s while calls are in flight to notice a vanished host: accept that rather
    # than answering with GOAWAY "too_many_pings" (gRPC's default allows one ping per 5 minutes without data).
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    # And the server pings its clients while their calls are open (none on idle connections): a client whose host
    # vanished mid-call (an upload, a watch stream) is noticed in 15 s and its calls are cancelled, which releases
    # what they hold, instead of after TCP's or gRPC's default of two hours.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


def grpc_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel/server options carrying the message size limits."""
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
    ]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GrpcService:
    """A running service: a grpc.aio server with health, reflection, tracing and error mapping, registered in
    Consul.

    Health starts NOT_SERVING; the service calls `set_serving(True)` once it can answer. Shutdown follows one
    order: health NOT_SERVING, deregister from Consul, stop the server with a grace period, then run the
    service's own cleanups (close Redis, channels) in reverse order of registration.

    The registration heals: every `consul_resync_interval` the service asks its local agent for its own record and
    registers again (checks, tags, meta) when the agent lost it (a restarted dev agent keeps nothing) or holds
    an older one (a tag change made while the agent was down), with backoff and jitter while the agent is away.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        settings: ServiceSettings,
        tracer_provider: TracerProvider,
        *,
        service_port: int = 0,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        """`service_port`: the port registered in Consul when it is not this server's own: a multi-process
        replica's supervisor (kit.replica) answers the health check here and its workers serve on service_port.

        `metrics`: the service's Prometheus registry; given, the server records its RPC metrics there
        (kit.metrics) and serves it on settings.metrics_port (unless that is -1) as it starts, or earlier with
        serve_metrics()."""
        self.spec = spec
        self.settings = settings
        self.port = 0
        self._service_port = service_port
        self._health = health.aio.HealthServicer()
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        self._on_stopping: list[Callable[[], None]] = []
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = -1
        self._consul: ConsulClient | None = None
        self._registration: Registration | None = None
        self._keeper: asyncio.Task | None = None
        self._serving = False
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tls = False
        # The service sets tracing up (kit.telemetry.setup_tracing) before it builds its channels, so that they get
        # the client interceptors, and passes the provider in.
        self._tracer_provider = tracer_provider
        self.metrics = metrics
        self._rpc_metrics = RpcMetrics(metrics, spec.name) if metrics is not None else None
        self._metrics_endpoint = MetricsEndpoint(metrics) if metrics is not None else None

    @property
    def metrics_port(self) -> int:
        """The bound /metrics port (-1: not served)."""
        return self._metrics_endpoint.port if self._metrics_endpoint is not None else -1

    def serve_metrics(self) -> int:
        """Serves /metrics on settings.metrics_port unless it is -1 or no registry was given; returns the bound
        port (-1: not served). Called by start(); a service may call it earlier (a predictor worker serves its
        metrics while its models load, before it binds its gRPC port)."""
        port = getattr(self.settings, "metrics_port", -1)
        if self._metrics_endpoint is None or port < 0:
            return -1
        if self._metrics_endpoint.port < 0:
            self._metrics_endpoint.start(port, self.settings.host)
            endpoint = self._metrics_endpoint
            self._cleanups.insert(0, lambda: asyncio.to_thread(endpoint.stop))  # runs last
        return self._metrics_endpoint.port

    def add_cleanup(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Runs `cleanup()` at shutdown, after the server has stopped."""
        self._cleanups.append(cleanup)

    def on_stopping(self, callback: Callable[[], None]) -> None:
        """Calls `callback()` when shutdown begins, before the server stops: e.g. to end streams that never end by
        themselves, so that they do not hold the grace period."""
        self._on_stopping.append(callback)

    async def start(self) -> int:
        """Binds, starts serving (health NOT_SERVING) and registers in Consul; returns the bound port."""
        await resolve_addresses(self.settings)
        provider = self._tracer_provider
        self.add_cleanup(lambda: asyncio.to_thread(provider.shutdown))
        credentials = self._server_credentials()
        # Callers are known by their certificates: without internal TLS (loopback only) there is no one to check.
        internal = credentials is not None and not self.spec.public
        callers = self.spec.callers if internal else frozenset()
        server = grpc.aio.server(
            interceptors=[*server_interceptors(provider), ErrorMappingInterceptor(callers, self._rpc_metrics)],
            options=[*grpc_options(self.settings), *KEEPALIVE_POLICY],
        )
        self.spec.add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [*self.spec.proto_services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        address = f"{self.settings.host}:{self.settings.port}"
        if credentials is not None:
            self.port = server.add_secure_port(address, credentials)
            self._tls = True
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.port}")
        control_socket = getattr(self.settings, "control_socket", "")
        if control_socket:  # a replica's worker: its supervisor and siblings reach it here (a 0700 directory)
            server.add_insecure_port(f"unix:{control_socket}")
        await server.start()
        self._server = server
        await self._serve_health()
        self.serve_metrics()
        await self.set_serving(False)
        logger.info("%s listening on %s:%d", self.spec.name, self.settings.host, self.port)
        if self.settings.consul_enabled:
            await self._register()
            self._keeper = asyncio.create_task(self._keep_registered(), name=f"{self.spec.name}-registration")
        return self.port

    async def _serve_health(self) -> None:
        """The health-only plaintext port (settings.health_port), when asked for: the same statuses, no API."""
        port = getattr(self.settings, "health_port", -1)
        if port < 0:
            return
        server = grpc.aio.server(options=list(KEEPALIVE_POLICY))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.health_port = server.add_insecure_port(f"{self.settings.host}:{port}")
        if self.health_port == 0:
            raise OSError(f"cannot bind the health port {self.settings.host}:{port}")
        await server.start()
        self._health_server = server

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """The public certificate for the gateway; internal mTLS for the others, whose plaintext is refused off
        loopback unless the operator allows it."""
        if self.spec.public:
            cert, key = getattr(self.settings, "tls_cert", None), getattr(self.settings, "tls_key", None)
            return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]) if cert and key else None
        internal = tls.from_dir(self.settings.internal_tls_dir, self.spec.name)
        if internal is not None:
            return internal.server_credentials()
        if not _loopback(self.settings.host) and not self.settings.allow_plaintext:
            raise RuntimeError(
                f"{self.spec.name} would serve plaintext gRPC on {self.settings.host}: set internal_tls_dir to the "
                "mesh's certificates (python -m services.kit.tls init DIR), bind a loopback address, or set "
                "allow_plaintext=true"
            )
        logger.warning("%s serves plaintext gRPC on loopback (internal_tls_dir is not set)", self.spec.name)
        return None

    @property
    def instance_id(self) -> str:
        """This instance's id in Consul."""
        port = self._service_port or self.port
        return self.settings.instance_id or f"{self.spec.name}-{self.settings.advertise_host}-{port}"

    async def set_serving(self, serving: bool) -> None:
        """Sets the overall health and that of every proto service this server serves."""
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.spec.proto_services):
            await self._health.set(name, status)

    async def set_health(self, name: str, serving: bool) -> None:
        """Sets the health of one named part (e.g. a loaded model) without touching the others."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(name, status)

    async def update_registration(self, *, tags: list[str] | None = None, meta: dict[str, str] | None = None) -> None:
        """Re-registers with new tags or meta (e.g. the models a predictor serves). When the agent cannot be
        reached, the change is kept and the registration keeper makes it when the agent is back. Nothing once the
        service is stopping: it has deregistered, and must not appear again."""
        if self._registration is None or self._consul is None or self._stopping:
            return
        if tags is not None:
            self._registration.tags = list(tags)
        if meta is not None:
            self._registration.meta = dict(meta)
        try:
            await self._consul.register(self._registration, passing=self._serving)
        except httpx.HTTPError as exc:
            logger.warning("Consul unreachable (%s); %s registers its new tags when it is back", exc, self.instance_id)

    async def _register(self) -> None:
        self._consul = ConsulClient(self.settings.consul_url, token=self.settings.consul_token)
        self._registration = Registration(
            id=self.instance_id,
            name=self.spec.name,
            address=self.settings.advertise_host,
            port=self._service_port or self.port,
            check_port=self.port if self._service_port else 0,
            tags=list(self.spec.tags),
            meta={"version": self.spec.version, **self.spec.meta},
            check_interval=self.settings.consul_check_interval,
            check_timeout=self.settings.consul_check_timeout,
            deregister_critical_after=self.settings.consul_deregister_after,
            tls=self._tls,
        )
        for attempt in range(20):
            try:
                await self._consul.register(self._registration, passing=self._serving)
                return
            except ConsulAclError:
                raise  # a refused token does not get better with retries; its message names the setting to fix
            except httpx.HTTPError as exc:
                if attempt == 19:
                    raise
                logger.warning("Consul at %s not reachable (%s); retrying", self.settings.consul_url, exc)
                await asyncio.sleep(0.5)

    async def _keep_registered(self) -> None:
        """Re-registers whenever the local agent's record of this instance is missing or out of date."""
        assert self._consul is not None and self._registration is not None
        backoff = Backoff(initial=0.5, maximum=self.settings.consul_resync_interval * 2)
        interval = self.settings.consul_resync_interval
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                registered = await self._consul.registered(self.instance_id)
                if registered is None or not self._registration.matches(registered):
                    reason = "lost it" if registered is None else "holds an older record"
                    await self._consul.register(self._registration, passing=self._serving)
                    logger.warning("registered %s again: the Consul agent %s", self.instance_id, reason)
            except httpx.HTTPError as exc:
                delay = backoff.next()
                logger.warning(
                    "Consul agent unreachable (%s); checking %s again in %.1fs", exc, self.instance_id, delay
                )
                continue
            backoff.reset()
            # Spread the checks of many instances so that they do not reach a restarted agent all at once.
            delay = interval * random.uniform(0.8, 1.2)

    async def stop(self) -> None:
        """Shuts down in order; safe to call twice."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        logger.info("%s shutting down", self.spec.name)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await self.set_serving(False)
        if self._consul is not None:
            try:
                await self._consul.deregister(self.instance_id)
            except httpx.HTTPError as exc:
                logger.warning("could not deregister %s from Consul: %s", self.instance_id, exc)
            await self._consul.close()
        for callback in self._on_stopping:
            callback()
        if self._server is not None:
            grace = self.settings.shutdown_grace_seconds
            try:  # grpc.aio's stop has been seen to outlive its grace period by far on a loaded machine
                await asyncio.wait_for(self._server.stop(grace), grace + 5)
            except TimeoutError:
                logger.warning("%s: the gRPC server did not stop %.0fs after its grace period", self.spec.name, 5.0)
        if self._health_server is not None:
            await self._health_server.stop(None)
        for cleanup in reversed(self._cleanups):
            try:
                await cleanup()
            except Exception:  # noqa: BLE001 - one failed cleanup must not skip the others
                logger.exception("cleanup failed during shutdown")
        self._stopped.set()

    async def run_until_signal(self) -> None:
        """Serves until SIGTERM or SIGINT, then stops."""
        await until_signal()
        await self.stop()


async def until_signal() -> None:
    """Returns when the process gets SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
