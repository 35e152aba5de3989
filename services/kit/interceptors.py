"""The one server interceptor that turns domain errors into gRPC status codes, and bytes that do not parse as the
method's request message into INVALID_ARGUMENT (gRPC itself would answer INTERNAL or UNKNOWN): on a unary call at
once, on a stream when the malformed message is read, which ends the stream. Given a service's RpcMetrics
(kit.metrics), its wrapper also records every call's status, duration and the calls in flight: no second
interceptor layer (each costs CPU on every call)."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from modelgrid.client import errors
from services.kit.metrics import MethodRecorder, RpcMetrics
from services.kit.redis_client import is_outage, outage_error
from services.kit.tls import peer_identity

logger = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.ModelgridError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_of(exc: errors.ModelgridError) -> grpc.StatusCode:
    """The status code for a domain error (its nearest mapped base class)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


# Status codes of a failed call to another service that say something about the caller's request; they are
# passed on with the other service's message. Any other failure of a dependency is UNAVAILABLE (retryable).
_PASSED_ON = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.ModelgridError):
        await context.abort(status_of(exc), _bounded(str(exc)))
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in _PASSED_ON:
            await context.abort(exc.code(), _bounded(exc.details() or exc.code().name))
        logger.warning("a dependency of %s failed: %s %s", method, exc.code().name, exc.details())
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"a service this call depends on failed ({exc.code().name})")
    if is_outage(exc):  # Redis down, restarting or replaying its AOF: retryable, never INTERNAL
        logger.warning("%s: Redis is unavailable: %s: %s", method, type(exc).__name__, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(outage_error(exc, _service_of(method))))
    incident = uuid.uuid4().hex[:12]
    logger.error("unexpected error in %s (incident %s)", method, incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server log has details")


MAX_DETAILS_BYTES = 1024
"""Longest status message sent, in UTF-8 bytes (gRPC percent-encodes what is not ASCII, up to 3x more): one that
quotes a huge request field would pass gRPC's limit on response metadata (8-16 KiB), and the client would see
RESOURCE_EXHAUSTED "metadata size exceeds" instead of the real status."""


def _bounded(details: str) -> str:
    data = details.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return details
    return data[: MAX_DETAILS_BYTES - 16].decode(errors="ignore") + "... (cut short)"


def _service_of(method: str) -> str:
    """The service of a method: "registry" for "/modelgrid.registry.v1.ModelRegistry/GetModel", "" for a method
    of no modelgrid service (health, reflection, TF Serving and KServe protocols)."""
    package = method.lstrip("/").split("/", 1)[0].split(".")
    return package[1] if len(package) > 2 and package[0] == "modelgrid" else ""


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps ModelgridError subclasses to their status code with their message, a failed call to another service
    and a Redis outage to UNAVAILABLE; anything else to INTERNAL with a generic message (the traceback goes to the
    log, never to the client).

    With `callers`, only peers whose client certificate names one of them (kit.tls) may call the service's own
    methods (health and reflection stay open to every peer the TLS handshake admitted): PERMISSION_DENIED otherwise.
    """

    def __init__(self, callers: frozenset[str] = frozenset(), metrics: RpcMetrics | None = None) -> None:
        self._callers = callers
        self._metrics = metrics
        # (method, handler) -> the wrapped handler: building one costs a few percent of a light call's CPU, and
        # servers (generic handlers included) hand out the same handler object for a method every time.
        self._wrapped: dict[tuple[str, object], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            if self._metrics is not None:
                self._metrics.unimplemented(handler_call_details.method)
            return None
        key = (handler_call_details.method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrap(handler_call_details.method, handler)
            if len(self._wrapped) >= _MAX_WRAPPED:
                self._wrapped.clear()
            self._wrapped[key] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        callers = self._callers if self._callers and not method.startswith(_OPEN_PREFIXES) else frozenset()
        parse = _tolerant(handler.request_deserializer)
        rec = self._metrics.recorder(method) if self._metrics is not None else None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, callers=callers, recorder=rec),
                parse,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, streamed=True, callers=callers, recorder=rec),
                parse,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, callers=callers, recorder=rec),
                parse,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method, streamed=True, callers=callers, recorder=rec),
            parse,
            handler.response_serializer,
        )


_MAX_WRAPPED = 1024  # wrapped handlers kept (methods times handler objects); cleared when full

# Methods every authenticated peer may call whatever `callers` says: Consul's health checks, reflection.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _admit(callers: frozenset[str], context: grpc.aio.ServicerContext) -> None:
    """PermissionDenied unless the peer's certificate names one of `callers` (no check when there are none)."""
    if callers and peer_identity(context) not in callers:
        who = peer_identity(context) or "a peer without a client certificate"
        raise errors.PermissionDenied(f"{who[:64]} may not call this service; it accepts {', '.join(sorted(callers))}")


class _Malformed:
    """What a request that does not parse becomes (instead of an exception inside gRPC)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(
            f"the request message ({self.size} bytes) does not parse as this method's protobuf request type"
        )


def _tolerant(parse: Callable | None) -> Callable | None:
    """The method's request deserializer, returning _Malformed instead of raising (None stays None: raw bytes)."""
    if parse is None:
        return None

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - DecodeError, or RuntimeError from some protobuf backends
            return _Malformed(len(data))

    return deserialize


async def _checked(requests: AsyncIterator) -> AsyncIterator:
    """A request stream that raises InvalidArgument at the first message that did not parse."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise request.error()
        yield request


def _wrap_unary(
    behavior: Callable,
    method: str,
    streamed: bool = False,
    callers: frozenset[str] = frozenset(),
    recorder: MethodRecorder | None = None,
):
    async def wrapper(request, context: grpc.aio.ServicerContext):
        if recorder is not None:
            started = time.perf_counter()
            recorder.in_flight.inc()
        code = None
        try:
            _admit(callers, context)
            if streamed:
                request = _checked(request)
            elif isinstance(request, _Malformed):
                raise request.error()
            return await behavior(request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except asyncio.CancelledError:  # the client went away, or the server is stopping
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, logged when unexpected
            await _abort_for(exc, context, method)
        finally:
            if recorder is not None:
                recorder.in_flight.dec()
                recorder.done(code or context.code(), started)

    return wrapper


def _wrap_stream(
    behavior: Callable,
    method: str,
    streamed: bool = False,
    callers: frozenset[str] = frozenset(),
    recorder: MethodRecorder | None = None,
):
    async def wrapper(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
        if recorder is not None:
            started = time.perf_counter()
            recorder.in_flight.inc()
        code = None
        try:
            _admit(callers, context)
            if streamed:
                request = _checked(request)
            elif isinstance(request, _Malformed):
                raise request.error()
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or the server is stopping
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, logged when unexpected
            await _abort_for(exc, context, method)
        finally:
            if recorder is not None:
                recorder.in_flight.dec()
                recorder.done(code or context.code(), started)

    return wrapper
