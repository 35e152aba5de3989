"""The native gRPC front: a generic handler that takes any call the routing table knows, checks its key, and
forwards it as bytes (metadata, deadline, cancellation, headers and trailers pass through)."""

import grpc

from services.gateway.auth import Authorizer
from services.gateway.proxy import End, Forwarder, Headers, passable
from services.kit.errors import ModelgridError
from services.kit.interceptors import status_of


def forwarded_metadata(metadata, identity_name: str) -> list[tuple[str, str | bytes]]:
    """The caller's metadata for the backend, with the client identity the audit trail records."""
    return [*(kv for kv in passable(metadata) if kv[0] != "x-modelgrid-client"), ("x-modelgrid-client", identity_name)]


class ProxyHandler(grpc.GenericRpcHandler):
    """Handles every routed method; returns None for the rest (health, reflection, the gateway's own API)."""

    def __init__(self, forwarder: Forwarder, authorizer: Authorizer) -> None:
        self._forwarder = forwarder
        self._authorizer = authorizer

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if self._forwarder.route(method) is None:
            return None

        async def proxy(request_iterator, context: grpc.aio.ServicerContext):
            metadata = context.invocation_metadata() or ()
            try:
                identity = await self._authorizer.check(method, metadata)
            except ModelgridError as exc:
                await context.abort(status_of(exc), str(exc))
            headers_sent = False
            frames = self._forwarder.forward(
                method, forwarded_metadata(metadata, identity.name), context.time_remaining(), request_iterator
            )
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

        return grpc.stream_stream_rpc_method_handler(proxy)
