"""The native gRPC front: a generic handler that takes any call the routing table knows, checks its key (and, for a
streaming call, its caller's open streams), and forwards it as bytes (metadata, deadline, cancellation, headers
and trailers pass through)."""

import contextlib

import grpc

from modelgrid.client.errors import ModelgridError
from services.gateway.auth import Authorizer
from services.gateway.proxy import End, Forwarder, Headers
from services.kit.interceptors import status_of

_MAX_CACHED = 1024
"""Method handlers kept (one per routed method path called)."""


class ProxyHandler(grpc.GenericRpcHandler):
    """Handles every routed method; returns None for the rest (health, reflection, the gateway's own API)."""

    def __init__(self, forwarder: Forwarder, authorizer: Authorizer) -> None:
        self._forwarder = forwarder
        self._authorizer = authorizer
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            route = self._forwarder.route(method)
            if route is None:
                return None
            handler = self._unary(method) if route.unary else self._stream(method)
            if len(self._handlers) < _MAX_CACHED:
                self._handlers[method] = handler
        return handler

    def _unary(self, method: str) -> grpc.RpcMethodHandler:
        forwarder, authorizer = self._forwarder, self._authorizer

        async def forward_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = context.invocation_metadata() or ()
            try:
                identity = await authorizer.check(method, metadata)
            except ModelgridError as exc:
                await context.abort(status_of(exc), str(exc))
            reply = await forwarder.unary(
                method, forwarder.request_metadata(metadata, identity.name), context.time_remaining(), request
            )
            if type(reply) is End:
                context.set_trailing_metadata(reply.trailers)
                await context.abort(reply.code, reply.details)
            if reply.headers:
                await context.send_initial_metadata(reply.headers)
            if reply.trailers:
                context.set_trailing_metadata(reply.trailers)
            return reply.response

        return grpc.unary_unary_rpc_method_handler(forward_unary)

    def _stream(self, method: str) -> grpc.RpcMethodHandler:
        forwarder, authorizer = self._forwarder, self._authorizer

        async def forward_stream(request_iterator, context: grpc.aio.ServicerContext):
            metadata = context.invocation_metadata() or ()
            try:
                identity = await authorizer.check(method, metadata)
                slot = authorizer.open_stream(identity, context.peer())
            except ModelgridError as exc:
                await context.abort(status_of(exc), str(exc))
            # The slot goes back when the call ends, however it ends: also when gRPC cancels the call while this
            # generator waits at a `yield` (then nothing runs its `finally` until it is garbage-collected).
            context.add_done_callback(lambda _: slot.close())
            frames = forwarder.stream(
                method,
                forwarder.request_metadata(metadata, identity.name),
                context.time_remaining(),
                request_iterator,
            )
            # aclosing: a cancelled caller closes the forwarding at once, which cancels the upstream call.
            with slot:
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        if type(frame) is bytes:
                            yield frame
                        elif type(frame) is Headers:
                            if frame.metadata:
                                await context.send_initial_metadata(frame.metadata)
                        else:
                            context.set_trailing_metadata(frame.trailers)
                            if frame.code != grpc.StatusCode.OK:
                                await context.abort(frame.code, frame.details)
                            return

        return grpc.stream_stream_rpc_method_handler(forward_stream)
