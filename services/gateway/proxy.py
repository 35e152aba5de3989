"""The forwarding core both public fronts (native gRPC and gRPC-Web) use: route a call by its method path to a
backend service, pick an instance (by model for predictor calls, fewest calls in flight), pass the messages
through as bytes, and retry on another instance a call that failed UNAVAILABLE before any response.

A call is a stream of frames: Headers, then Messages, then End (status and trailers), whatever its kind (unary,
client, server or bidirectional streaming): the gateway never needs to know a method's shape or message types.
"""

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from services.gateway.canary import CanaryWeights
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import model_of, redirect_to_alias
from services.gateway.settings import GatewaySettings
from services.gateway.upstreams import Backends
from services.kit.errors import ModelgridError
from services.kit.telemetry import tracing_enabled

logger = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
MAX_REPLAY_BYTES = 4 * 1024 * 1024
"""Requests larger than this are not kept for a retry (a big upload is not retried)."""

# Headers that belong to a hop (HTTP/2, gRPC framing, credentials). With tracing on, the trace context is
# re-created by the gateway's own client (its span is the backend's parent); with tracing off it passes as is.
_HOP_HEADERS = {
    "user-agent", "content-type", "te", "host", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
    "authorization", "x-api-key", "x-grpc-web", "x-user-agent",
}  # fmt: skip
_TRACE_HEADERS = {"traceparent", "tracestate"}


@dataclass
class Headers:
    metadata: Metadata


@dataclass
class Message:
    data: bytes


@dataclass
class End:
    code: grpc.StatusCode
    details: str
    trailers: Metadata = field(default_factory=tuple)


Frame = Headers | Message | End


def passable(metadata: Metadata) -> list[tuple[str, str | bytes]]:
    """Metadata to pass on to the other side: everything but hop-by-hop and credential headers."""
    dropped = _HOP_HEADERS | _TRACE_HEADERS if tracing_enabled() else _HOP_HEADERS
    return [(k, v) for k, v in metadata if k.lower() not in dropped and not k.startswith(":")]


class _Replay:
    """The client's request stream, kept (up to a size) so that a failed attempt can be replayed elsewhere."""

    def __init__(self, requests: AsyncIterator[bytes], first: bytes | None) -> None:
        self._requests = requests
        self.kept: list[bytes] = [] if first is None else [first]
        self.size = sum(map(len, self.kept))
        self.done = first is None
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


class Forwarder:
    """Routes and forwards calls."""

    def __init__(
        self, settings: GatewaySettings, backends: Backends, canary: CanaryWeights, metrics: GatewayMetrics
    ) -> None:
        self._settings = settings
        self._backends = backends
        self._canary = canary
        self._metrics = metrics
        self._prefixes = sorted(settings.routes.items(), key=lambda item: len(item[0]), reverse=True)
        self._non_idempotent = set(settings.non_idempotent_methods)

    def route(self, method: str) -> str | None:
        """The Consul service a method path ("/pkg.Service/Method") goes to, or None."""
        service_name = method.lstrip("/").split("/", 1)[0]
        for prefix, service in self._prefixes:
            if service_name.startswith(prefix):
                return service
        return None

    async def forward(
        self,
        method: str,
        metadata: Metadata,
        timeout: float | None,
        requests: AsyncIterator[bytes],
        *,
        unary: bool = False,
    ) -> AsyncIterator[Frame]:
        """Forwards one call; yields its frames. Never raises for backend failures: they end as End frames.

        `unary` (one request, one response, known from the method's descriptor) forwards it as a unary call,
        which costs the gateway about a third less than the general streaming path."""
        service = self.route(method)
        if service is None:
            yield End(grpc.StatusCode.UNIMPLEMENTED, f"the gateway routes no service for {method}")
            return
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        code = grpc.StatusCode.UNKNOWN
        try:
            first = await anext(requests, None)
            model, alias = model_of(method, first)
            if first is not None and model and alias == self._settings.stable_alias:
                if self._canary.pick_canary(model):
                    first = redirect_to_alias(method, first, self._settings.canary_alias)
                    self._metrics.canary.labels(model).inc()
            replay = _Replay(requests, first)
            replay.done = replay.done or unary
            async for frame in self._attempts(method, service, model, metadata, deadline, replay, unary):
                if isinstance(frame, End):
                    code = frame.code
                yield frame
        finally:
            self._metrics.observe(service, method, code.name, time.monotonic() - started)

    async def _attempts(
        self, method, service, model, metadata, deadline, replay: _Replay, unary: bool
    ) -> AsyncIterator[Frame]:
        try:
            backend = await self._backends.get(service)
        except Exception as exc:  # noqa: BLE001 - Consul unreachable: the call is UNAVAILABLE, not INTERNAL
            yield End(grpc.StatusCode.UNAVAILABLE, f"cannot resolve {service}: {exc}")
            return
        retry_allowed = method not in self._non_idempotent or any(k == "idempotency-key" for k, _ in metadata)
        tried: list[str] = []
        for attempt in range(1, self._settings.retry_attempts + 1):
            try:
                upstream = backend.pick(tag=f"model={model}" if model else "", exclude=tried)
            except ModelgridError as exc:
                yield End(grpc.StatusCode.UNAVAILABLE, str(exc))
                return
            tried.append(upstream.target)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            if unary:
                request = replay.kept[0] if replay.kept else b""
                call = upstream.channel.unary_unary(method)(request, metadata=metadata, timeout=remaining)
            else:
                call = upstream.channel.stream_stream(method)(replay.stream(), metadata=metadata, timeout=remaining)
            upstream.outstanding += 1
            answered = False
            try:
                if unary:
                    response = await call
                    answered = True
                    yield Headers(passable(await call.initial_metadata()))
                    yield Message(response)
                    yield End(await call.code(), await call.details() or "", passable(await call.trailing_metadata()))
                    return
                async for message in call:
                    if not answered:
                        answered = True
                        yield Headers(passable(await call.initial_metadata()))
                    yield Message(message)
                if not answered:
                    yield Headers(passable(await call.initial_metadata()))
                yield End(await call.code(), await call.details() or "", passable(await call.trailing_metadata()))
                return
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    backend.eject(upstream, self._settings.eject_seconds)
                    self._metrics.ejections.labels(service).inc()
                retry = (
                    err.code() == grpc.StatusCode.UNAVAILABLE and not answered and replay.done and replay.replayable
                    and retry_allowed and attempt < self._settings.retry_attempts
                )  # fmt: skip
                if retry:
                    self._metrics.retries.labels(service).inc()
                    logger.info("%s failed UNAVAILABLE on %s; retrying elsewhere", method, upstream.target)
                    continue
                yield End(err.code(), err.details() or "", passable(err.trailing_metadata() or ()))
                return
            finally:
                upstream.outstanding -= 1
                if not call.done():
                    call.cancel()  # the client went away: cancel upstream too
