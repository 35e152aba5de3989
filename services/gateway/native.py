"""The native gRPC front: a generic handler that takes any call the routing table knows, checks its key, and
forwards it as bytes (metadata, deadline, cancellation, headers and trailers pass through)."""

import contextlib

import grpc
from google.protobuf import descriptor_pool

from services.gateway.auth import Authorizer
from services.gateway.proxy import End, Forwarder, Headers, passable
from services.kit.errors import ModelgridError
from services.kit.interceptors import status_of


def forwarded_metadata(metadata, identity_name: str) -> list[tuple[str, str | bytes]]:
    """The caller's metadata for the backend, with the client identity the audit trail records."""
    return [*(kv for kv in passable(metadata) if kv[0] != "x-modelgrid-client"), ("x-modelgrid-client", identity_name)]


def is_unary(method: str) -> bool:
    """Whether a method path is a unary call, from the descriptors of the protos this process imported (main.py
    imports the routed APIs); an unknown method is treated as streaming, which works for every shape."""
    if method not in _SHAPES:
        try:
            descriptor = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
            _SHAPES[method] = not descriptor.client_streaming and not descriptor.server_streaming
        except KeyError:
            _SHAPES[method] = False
    return _SHAPES[method]


_SHAPES: dict[str, bool] = {}


async def _one(request: bytes):
    yield request


class ProxyHandler(grpc.GenericRpcHandler):
    """Handles every routed method; returns None for the rest (health, reflection, the gateway's own API)."""

    def __init__(self, forwarder: Forwarder, authorizer: Authorizer) -> None:
        self._forwarder = forwarder
        self._authorizer = authorizer

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if self._forwarder.route(method) is None:
            return None

        async def unary_proxy(request: bytes, context: grpc.aio.ServicerContext):
            response = b""
            async for data in proxy(_one(request), context, unary=True):
                response = data
            return response

        async def proxy(request_iterator, context: grpc.aio.ServicerContext, unary: bool = False):
            metadata = context.invocation_metadata() or ()
            try:
                identity = await self._authorizer.check(method, metadata)
            except ModelgridError as exc:
                await context.abort(status_of(exc), str(exc))
            headers_sent = False
            frames = self._forwarder.forward(
                method,
                forwarded_metadata(metadata, identity.name),
                context.time_remaining(),
                request_iterator,
                unary=unary,
            )
            # aclosing: a cancelled caller closes the forwarding at once, which cancels the upstream call.
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if isinstance(frame, Headers):
                        if frame.metadata and not headers_sent:
                            await context.send_initial_metadata(frame.metadata)
                        headers_sent = True
                    elif isinstance(frame, End):
                        context.set_trailing_metadata(tuple(frame.trailers))
                        if frame.code != grpc.StatusCode.OK:
                            await context.abort(frame.code, frame.details)
                        return
                    else:
                        yield frame.data

        if is_unary(method):
            return grpc.unary_unary_rpc_method_handler(unary_proxy)
        return grpc.stream_stream_rpc_method_handler(proxy)
