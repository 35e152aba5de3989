"""The forwarding core both public fronts (native gRPC and gRPC-Web) use: route a call by its method path to a
backend service, pick an instance (by model for predictor calls, fewest calls in flight), pass the messages
through as bytes, and retry on another instance a call that failed UNAVAILABLE before any response.

A unary call (one request, one response: known from the method's descriptor) is one awaited upstream call:
`Forwarder.unary` returns a `Reply` (headers, response, trailers) or an `End` (a failed status with its trailers).
Any other call is a stream of frames, `Forwarder.stream`: Headers, then messages (bytes), then End (status and
trailers); the gateway never needs to know a method's message types.
"""

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool

from modelgrid.client.errors import ModelgridError
from services.gateway.call_status import BackendStatus, made_up
from services.gateway.canary import CanaryWeights
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import model_of, redirect_to_alias
from services.gateway.settings import GatewaySettings
from services.gateway.upstreams import Backends
from services.kit.channels import InstancePool, Member
from services.kit.telemetry import tracing_enabled

logger = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
MAX_REPLAY_BYTES = 4 * 1024 * 1024
"""Requests larger than this are not kept for a retry (a big upload is not retried)."""
CLIENT_HEADER = "x-modelgrid-client"
_MAX_CACHED = 1024
"""Entries per cache of method paths (routes, callables per channel): a flood of invented paths is not kept."""

# Headers that belong to a hop (HTTP/2, gRPC framing, credentials). With tracing on, the trace context is
# re-created by the gateway's own client (its span is the backend's parent); with tracing off it passes as is.
_HOP_HEADERS = frozenset(
    """user-agent content-type te host grpc-timeout grpc-encoding grpc-accept-encoding authorization x-api-key
    x-grpc-web x-user-agent""".split()
)
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_OK = grpc.StatusCode.OK
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass(slots=True)
class Headers:
    """The response headers of a streaming call (comes once, before its first message)."""

    metadata: Metadata


@dataclass(slots=True)
class End:
    """How a call ended: its status and trailers."""

    code: grpc.StatusCode
    details: str
    trailers: Metadata = ()


@dataclass(slots=True)
class Reply:
    """The answer of a unary call that succeeded."""

    headers: Metadata
    response: bytes
    trailers: Metadata


Frame = Headers | bytes | End


def _shape(method: str) -> tuple[bool, bool]:
    """(takes one request message, gives one response message) of a method path, from the descriptors of the
    protos this process imported (main.py imports the routed APIs); an unknown method is taken as bidirectional
    streaming, which works for every shape."""
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:
        return False, False
    return not descriptor.client_streaming, not descriptor.server_streaming


def is_unary(method: str) -> bool:
    """Whether a method path is a unary call (one request, one response; see _shape)."""
    return _shape(method) == (True, True)


_METHOD_PATH = re.compile(r"/([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)/([A-Za-z_][A-Za-z0-9_]*)")


def _may_exist(method: str) -> bool:
    """Whether a path can name a protobuf method at all ("/package.Service/Method", identifiers only)."""
    return _METHOD_PATH.fullmatch(method) is not None


@dataclass(slots=True)
class Route:
    """Where a method goes: the Consul service, whether the method is unary, whether it takes exactly one request
    message (unary and server streaming), and the service's pool once known."""

    service: str
    unary: bool
    one_request: bool = False
    pool: InstancePool | None = None


class _Replay:
    """The client's request stream, kept (up to a size) so that a failed attempt can be replayed elsewhere."""

    def __init__(self, requests: AsyncIterator[bytes], first: bytes | None, *, done: bool = False) -> None:
        self._requests = requests
        self.kept: list[bytes] = [] if first is None else [first]
        self.size = sum(map(len, self.kept))
        self.done = done or first is None
        self.replayable = True

    async def stream(self) -> AsyncIterator[bytes]:
        for message in list(self.kept):
            yield message
        while not self.done:
            try:
                message = await anext(self._requests)
            except StopAsyncIteration:
                self.done = True
                return
            self.size += len(message)
            if self.size > MAX_REPLAY_BYTES:
                self.replayable, self.kept = False, []
            elif self.replayable:
                self.kept.append(message)
            yield message


async def _send(call: grpc.aio.StreamStreamCall, messages: AsyncIterator[bytes]) -> None:
    """Writes the request messages to the upstream call, then half-closes it. A backend may answer before it has
    read them all (e.g. INVALID_ARGUMENT on the first): writing then stops quietly and the backend's status says
    why (grpc.aio reports INTERNAL for the failed write: BackendStatus keeps the backend's status instead). A
    caller whose own stream fails cancels the upstream call."""
    try:
        async for message in messages:
            await call.write(message)
        await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        return
    except Exception:
        call.cancel()
        raise


def _request_count(method: str, some: bool) -> str:
    """The caller's message for a call of a one-request method with none, or with more than one."""
    sent = "more than one" if some else "none"
    return f"{method} takes exactly one request message; this call sent {sent}"


class Forwarder:
    """Routes and forwards calls. Never raises for a backend's failure: it ends the call with the status."""

    def __init__(
        self, settings: GatewaySettings, backends: Backends, canary: CanaryWeights, metrics: GatewayMetrics
    ) -> None:
        self._backends = backends
        self._canary = canary
        self._metrics = metrics
        self._prefixes = sorted(settings.routes.items(), key=lambda item: len(item[0]), reverse=True)
        self._non_idempotent = frozenset(settings.non_idempotent_methods)
        self._preferred_tags = dict(settings.preferred_tags)
        self._attempts = settings.retry_attempts
        self._eject_seconds = settings.eject_seconds
        self._stable_alias = settings.stable_alias
        self._canary_alias = settings.canary_alias
        # Decided once: main.py sets tracing up before it builds the forwarder.
        self._dropped = _HOP_HEADERS | _TRACE_HEADERS if tracing_enabled() else _HOP_HEADERS
        self._dropped_from_caller = self._dropped | {CLIENT_HEADER}
        self._routes: dict[str, Route | None] = {}
        # channel -> method -> its multi-callable (making one costs more than picking the instance)
        self._unary_calls: dict[grpc.aio.Channel, dict] = {}
        self._stream_calls: dict[grpc.aio.Channel, dict] = {}
        self._watched: set[str] = set()  # services whose pool tells _forget_departed about changes

    # -- routing -----------------------------------------------------------------------------------------------

    def route(self, method: str) -> Route | None:
        """Where a method path ("/pkg.Service/Method") goes, or None when the routes name no service for it or the
        path cannot name a protobuf method (UNIMPLEMENTED here, without a call to a backend). A well-formed method
        the gateway has no descriptor of is forwarded: a backend's new API needs no gateway change."""
        route = self._routes.get(method, False)
        if route is False:
            service_name = method.lstrip("/").split("/", 1)[0]
            service = next((s for prefix, s in self._prefixes if service_name.startswith(prefix)), None)
            if service is not None and not _may_exist(method):
                service = None
            if service is None:
                route = None
            else:
                one_request, one_response = _shape(method)
                route = Route(service, one_request and one_response, one_request)
            if len(self._routes) < _MAX_CACHED:
                self._routes[method] = route
        return route

    def passable(self, metadata: Metadata) -> tuple[tuple[str, str | bytes], ...]:
        """Metadata to pass on to the other side: everything but hop-by-hop and credential headers."""
        dropped = self._dropped
        return tuple([(k, v) for k, v in metadata if k.lower() not in dropped and k[:1] != ":"])

    def request_metadata(self, metadata: Metadata, client: str) -> list[tuple[str, str | bytes]]:
        """The caller's metadata for the backend, with the client identity the audit trail records."""
        dropped = self._dropped_from_caller
        forwarded = [(k, v) for k, v in metadata if k.lower() not in dropped and k[:1] != ":"]
        forwarded.append((CLIENT_HEADER, client))
        return forwarded

    async def _pool(self, route: Route) -> InstancePool:
        pool = await self._backends.get(route.service)
        if route.service not in self._watched:
            self._watched.add(route.service)
            pool.add_listener(self._forget_departed)
        route.pool = pool
        return pool

    @staticmethod
    def _unresolved(service: str, exc: Exception) -> str:
        """The caller's message when the first lookup of a service in Consul fails (the cause goes to the log)."""
        logger.warning("cannot find the instances of %s in Consul: %s", service, exc)
        return f"the gateway cannot find {service} instances: service discovery (Consul) does not answer; retry soon"

    def _forget_departed(self) -> None:
        """Drops the cached callables of channels no pool uses any more."""
        live = {m.channel for pool in self._backends.all.values() for m in pool.members.values()}
        for cache in (self._unary_calls, self._stream_calls):
            for channel in [c for c in cache if c not in live]:
                del cache[channel]

    def _prepare(self, method: str, first: bytes | None, service: str) -> tuple[bytes | None, str]:
        """The first request (sent to the canary alias for its share of a model's stable traffic) and the
        instance tag to prefer ("model=<name>" for a predictor call, the service's preferred tag otherwise: the
        trainer's "leader")."""
        model, alias = model_of(method, first)
        if not model:
            return first, self._preferred_tags.get(service, "")
        if alias == self._stable_alias and self._canary.pick_canary(model):
            first = redirect_to_alias(method, first, self._canary_alias)
            self._metrics.canary.labels(model).inc()
        return first, f"model={model}"

    def _failed(
        self, method: str, pool: InstancePool, member: Member, code: grpc.StatusCode, retry_possible: bool
    ) -> bool:
        """Ejects an instance that failed UNAVAILABLE; True when the call should be tried on another one."""
        if code != _UNAVAILABLE:
            return False
        pool.eject(member, self._eject_seconds)
        self._metrics.ejections.labels(pool.service).inc()
        if retry_possible:
            self._metrics.retries.labels(pool.service).inc()
            logger.info("%s failed UNAVAILABLE on %s; retrying elsewhere", method, member.target)
        return retry_possible

    @staticmethod
    async def _backend_end(method: str, status: BackendStatus, made_up_end: End) -> End:
        """How the backend ended a call whose status grpc.aio replaced with its INTERNAL for a failed write."""
        if await status.wait():
            return End(status.code, status.details, status.trailers)
        logger.warning("%s: no status from the backend after a failed write", method)
        return made_up_end

    def _retry_allowed(self, method: str, metadata: Metadata) -> bool:
        """Calls that change state are retried only with an idempotency key."""
        return method not in self._non_idempotent or any(k == "idempotency-key" for k, _ in metadata)

    # -- unary calls -------------------------------------------------------------------------------------------

    async def unary(self, method: str, metadata: Metadata, timeout: float | None, request: bytes) -> Reply | End:
        """Forwards one unary call: its Reply, or the End of a call that failed."""
        route = self.route(method)
        if route is None:
            return End(grpc.StatusCode.UNIMPLEMENTED, f"the gateway routes no service for {method}")
        started = time.monotonic()
        code = grpc.StatusCode.UNKNOWN
        try:
            request, tag = self._prepare(method, request, route.service)
            try:
                pool = route.pool or await self._pool(route)
            except Exception as exc:  # noqa: BLE001 - Consul unreachable: the call is UNAVAILABLE, not INTERNAL
                code = _UNAVAILABLE
                return End(_UNAVAILABLE, self._unresolved(route.service, exc))
            tried: tuple[str, ...] = ()  # targets that failed this call
            last: End | None = None  # how the last attempt failed: said when no other instance is left
            remaining = timeout
            while True:
                try:
                    member = pool.pick(tag=tag, exclude=tried)
                except ModelgridError as exc:
                    code = _UNAVAILABLE
                    return last or End(_UNAVAILABLE, str(exc))
                calls = self._unary_calls.get(member.channel)
                if calls is None:
                    calls = self._unary_calls[member.channel] = {}
                callable_ = calls.get(method)
                if callable_ is None:
                    callable_ = member.channel.unary_unary(method)
                    if len(calls) < _MAX_CACHED:
                        calls[method] = callable_
                call = callable_(request, metadata=metadata, timeout=remaining)
                member.in_flight += 1
                try:
                    response = await call
                    reply = Reply(
                        self.passable(await call.initial_metadata()),
                        response,
                        self.passable(await call.trailing_metadata()),
                    )
                    code = _OK
                    return reply
                except grpc.aio.AioRpcError as err:
                    tried += (member.target,)
                    retry = len(tried) < self._attempts and self._retry_allowed(method, metadata)
                    last = End(err.code(), err.details() or "", self.passable(err.trailing_metadata() or ()))
                    if not self._failed(method, pool, member, err.code(), retry):
                        code = err.code()
                        return last
                finally:
                    member.in_flight -= 1
                    if not call.done():
                        call.cancel()  # the caller went away: cancel upstream too
                if timeout is not None:
                    remaining = max(started + timeout - time.monotonic(), 0.001)
        finally:
            self._metrics.observe(route.service, method, code, time.monotonic() - started)

    # -- streaming calls ---------------------------------------------------------------------------------------

    async def stream(
        self, method: str, metadata: Metadata, timeout: float | None, requests: AsyncIterator[bytes]
    ) -> AsyncIterator[Frame]:
        """Forwards a call of any shape; yields its frames, the End last. Closing the generator cancels the
        upstream call. A method that takes one request message (server streaming) is forwarded once the caller's
        request stream has ended with exactly one: any other number is INVALID_ARGUMENT here (a backend would
        read the first and never look at the rest)."""
        route = self.route(method)
        if route is None:
            yield End(grpc.StatusCode.UNIMPLEMENTED, f"the gateway routes no service for {method}")
            return
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        code = grpc.StatusCode.UNKNOWN
        try:
            first = await anext(requests, None)
            if route.one_request and (first is None or await anext(requests, None) is not None):
                code = grpc.StatusCode.INVALID_ARGUMENT
                yield End(code, _request_count(method, first is not None))
                return
            first, tag = self._prepare(method, first, route.service)
            replay = _Replay(requests, first, done=route.one_request)
            try:
                pool = route.pool or await self._pool(route)
            except Exception as exc:  # noqa: BLE001 - Consul unreachable: the call is UNAVAILABLE, not INTERNAL
                code = _UNAVAILABLE
                yield End(_UNAVAILABLE, self._unresolved(route.service, exc))
                return
            tried: tuple[str, ...] = ()  # targets that failed this call
            last: End | None = None  # how the last attempt failed: said when no other instance is left
            while True:
                try:
                    member = pool.pick(tag=tag, exclude=tried)
                except ModelgridError as exc:
                    code = _UNAVAILABLE
                    yield last or End(_UNAVAILABLE, str(exc))
                    return
                calls = self._stream_calls.get(member.channel)
                if calls is None:
                    calls = self._stream_calls[member.channel] = {}
                callable_ = calls.get(method)
                if callable_ is None:
                    callable_ = member.channel.stream_stream(method)
                    if len(calls) < _MAX_CACHED:
                        calls[method] = callable_
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
                call = callable_(metadata=metadata, timeout=remaining)
                status = BackendStatus(call)
                sending = asyncio.create_task(_send(call, replay.stream()))
                member.in_flight += 1
                answered = False
                try:
                    async for message in call:
                        if not answered:
                            answered = True
                            yield Headers(self.passable(await call.initial_metadata()))
                        yield message
                    if not answered:
                        yield Headers(self.passable(await call.initial_metadata()))
                    end = End(await call.code(), await call.details() or "", await call.trailing_metadata() or ())
                    if made_up(end.code, end.details):  # a write failed after the backend had ended the call OK
                        end = await self._backend_end(method, status, end)
                    code = end.code
                    yield End(code, end.details, self.passable(end.trailers))
                    return
                except grpc.aio.AioRpcError as err:
                    last = End(err.code(), err.details() or "", err.trailing_metadata() or ())
                    if made_up(last.code, last.details):
                        last = await self._backend_end(method, status, last)
                    last.trailers = self.passable(last.trailers)
                    tried += (member.target,)
                    retry = (
                        not answered
                        and replay.done
                        and replay.replayable
                        and len(tried) < self._attempts
                        and self._retry_allowed(method, metadata)
                    )
                    if not self._failed(method, pool, member, last.code, retry):
                        code = last.code
                        yield last
                        return
                finally:
                    member.in_flight -= 1
                    sending.cancel()
                    if not call.done():
                        call.cancel()  # the caller went away: cancel upstream too
        finally:
            self._metrics.observe(route.service, method, code, time.monotonic() - started)
