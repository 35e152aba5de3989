"""In-process fixtures of the gateway's unit tests: small real gRPC backends (grpc.aio servers on port 0 in this
process, registered in the session's real Consul under a service name of their own) and a Forwarder over them.

A backend answers any method: unary when the method's descriptor says so, a bidirectional echo otherwise. What it
does is chosen by the caller's `x-test-action` header (the gateway passes metadata through):
  echo (default)         the request back, header x-replica and trailer x-trailer naming the backend
  unavailable            UNAVAILABLE (from every backend)
  unavailable-on:<name>  UNAVAILABLE from that backend, echo from the others
  not-found              NOT_FOUND with trailer x-trailer
  sleep                  waits until cancelled (for deadlines and cancellation)
  refuse-first           (streams) INVALID_ARGUMENT right after the first request message, the rest unread
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest_asyncio
from grpc_health.v1 import health, health_pb2_grpc

import modelgrid.predictor.v1.predictor_pb2  # noqa: F401 - the descriptors that make Predictor methods unary
from services.gateway.canary import CanaryWeights
from services.gateway.metrics import GatewayMetrics
from services.gateway.proxy import Forwarder, is_unary
from services.gateway.settings import GatewaySettings
from services.gateway.upstreams import Backends
from services.kit.consul import ConsulClient, Registration

MODEL = "m1"
"""The model backend "a" serves (its Consul tag is model=m1); backend "b" carries no model tag."""


@dataclass
class Backend:
    """A test backend and what it saw."""

    name: str
    port: int = 0
    server: grpc.aio.Server | None = None
    metadata: list[tuple[str, str | bytes]] = field(default_factory=list)
    calls: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _begin(self, context: grpc.aio.ServicerContext) -> str:
        self.calls += 1
        self.metadata = list(context.invocation_metadata() or ())
        action = dict(self.metadata).get("x-test-action", "echo")
        if action in ("unavailable", f"unavailable-on:{self.name}"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        if action == "not-found":
            context.set_trailing_metadata((("x-trailer", self.name),))
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if action == "sleep":
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await context.send_initial_metadata((("x-replica", self.name),))
        context.set_trailing_metadata((("x-trailer", self.name),))
        return action

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._begin(context)
        return request

    async def stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        if dict(context.invocation_metadata() or ()).get("x-test-action") == "refuse-first":
            self.calls += 1
            await anext(aiter(requests), None)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is wrong")
        messages = [request async for request in requests]  # the whole request stream first, then the answer
        await self._begin(context)
        for message in messages:
            yield message


class _AnyMethod(grpc.GenericRpcHandler):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method.startswith("/grpc.health.v1."):
            return None  # the health servicer (Consul's check)
        if is_unary(handler_call_details.method):
            return grpc.unary_unary_rpc_method_handler(self._backend.unary)
        return grpc.stream_stream_rpc_method_handler(self._backend.stream)


async def _start(backend: Backend, consul: ConsulClient, service: str, tags: list[str]) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_AnyMethod(backend),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    backend.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    backend.server = server
    await consul.register(
        Registration(
            id=f"{service}-{backend.name}",
            name=service,
            address="127.0.0.1",
            port=backend.port,
            tags=tags,
            check_interval="500ms",
        )
    )


@dataclass
class Mesh:
    """Two backends of one Consul service, and the gateway settings that route the predictor API to them."""

    service: str
    backends: dict[str, Backend]
    consul_url: str

    def settings(self, *, routes: dict[str, str] | None = None, **overrides) -> GatewaySettings:
        """Settings routing the predictor API (and `routes`, "<prefix>": "backends" meaning these backends) here."""
        routes = {prefix: self.service if s == "backends" else s for prefix, s in (routes or {}).items()}
        return GatewaySettings(
            consul_url=self.consul_url,
            routes={"modelgrid.predictor.v1.": self.service, "modelgrid.nowhere.v1.": f"{self.service}-none", **routes},
            eject_seconds=30,
            **overrides,
        )

    def reset(self) -> None:
        for backend in self.backends.values():
            backend.calls = 0
            backend.metadata = []
            backend.started.clear()
            backend.cancelled.clear()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(consul) -> AsyncIterator[Mesh]:
    """Backends "a" (tag model=m1) and "b", healthy in Consul; shared by the tests of a module."""
    service = f"gw-unit-{uuid.uuid4().hex[:8]}"
    client = ConsulClient(consul.http_url)
    backends = {"a": Backend("a"), "b": Backend("b")}
    await _start(backends["a"], client, service, [f"model={MODEL}"])
    await _start(backends["b"], client, service, [])
    for _ in range(200):
        _, healthy = await client.healthy_instances(service)
        if len(healthy) == 2:
            break
        await asyncio.sleep(0.05)
    else:
        raise TimeoutError("the test backends never passed their Consul check")
    try:
        yield Mesh(service, backends, consul.http_url)
    finally:
        for backend in backends.values():
            await client.deregister(f"{service}-{backend.name}")
            await backend.server.stop(0)
        await client.close()


@dataclass
class Gateway:
    """A Forwarder and the parts it is made of."""

    settings: GatewaySettings
    forwarder: Forwarder
    backends: Backends
    metrics: GatewayMetrics
    canary: CanaryWeights

    def count(self, metric: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(metric, labels) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def new_gateway(mesh) -> AsyncIterator[Callable[..., Gateway]]:
    """`await new_gateway(**settings)`: a Forwarder over fresh pools (no ejections carried over from another test),
    with canary weights that are never followed (set `gateway.canary.weights` directly)."""
    made: list[tuple[Backends, ConsulClient]] = []
    mesh.reset()

    def make(**overrides) -> Gateway:
        settings = mesh.settings(**overrides)
        consul = ConsulClient(settings.consul_url)
        backends = Backends(consul, [])
        made.append((backends, consul))
        metrics = GatewayMetrics()
        canary = CanaryWeights(registry=None, tag=settings.canary_weight_tag)  # not started: no registry needed
        return Gateway(settings, Forwarder(settings, backends, canary, metrics), backends, metrics, canary)

    yield make
    for backends, consul in made:
        await backends.close()
        await consul.close()
