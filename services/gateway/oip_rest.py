"""The KServe v2 REST protocol (Open Inference Protocol over HTTP/JSON) on the web port, what `tritonclient.http`
speaks: each route is one unary OIP gRPC call (`inference.GRPCInferenceService`) made through the same Authorizer
and Forwarder as the gRPC and gRPC-Web fronts, so keys, scopes, rate limits, routing to the healthy predictors that
serve the model, retries, canary shares and metrics are theirs.

    GET  /v2                                              ServerMetadata (+ the binary_tensor_data extension)
    GET  /v2/health/live | /v2/health/ready               ServerLive | ServerReady of a predictor
    GET  /v2/models/{name}[/versions/{version}]           ModelMetadata
    GET  /v2/models/{name}[/versions/{version}]/ready     ModelReady
    POST /v2/models/{name}[/versions/{version}]/infer     ModelInfer (JSON, and the binary tensor data extension)

A version that is not a number is an alias, as on the predictors' OIP ("production": the canary takes its share).
Health answers 200 when true and 503 when false. Errors are `{"error": "..."}` with the HTTP status of the call's
gRPC status (400, 401, 403, 404, 413, 429, 503, 504...), the message the backend or the gateway gave, quoting at
most bounded excerpts of the request (its path, a datatype, an output name). The body obeys the web port's limits
(web_max_body_bytes, web_body_timeout_seconds; also once inflated, when it comes gzip or deflate encoded as
tritonclient.http can send it) and the JSON those of oip_json; a call has oip_rest_timeout_seconds, and a client that
goes away cancels it upstream.
"""

import asyncio
import json
import logging
import uuid

import grpc

from modelgrid.client.errors import ModelgridError
from services.gateway import grpcweb, oip_json
from services.gateway.asgi import BODY_DRAIN_SECONDS, Receive, Scope, Send, drain_body
from services.gateway.auth import Authorizer
from services.gateway.proxy import End, Forwarder
from services.gateway.settings import GatewaySettings
from services.kit.interceptors import status_of

logger = logging.getLogger(__name__)


SERVICE = "/inference.GRPCInferenceService/"
HEADER_LENGTH = "inference-header-content-length"
OFF_LOOP_BYTES = 1024 * 1024
"""Infer bodies larger than this are parsed in a thread."""
_REST_HEADERS = frozenset({HEADER_LENGTH, "content-encoding"})
"""Request headers that describe the HTTP body, not the call: not passed on as metadata."""
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""HTTP status of a call's gRPC status (anything else: 500)."""


class Failure(Exception):
    """Ends a REST call with an HTTP status and an error message. `drain`: read the rest of the request body before
    answering (not for a body that stalled)."""

    def __init__(self, status: int, message: str, headers=(), *, drain: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.drain = drain


class ClientGone(Exception):
    """The client went away: there is nobody to answer."""


def _failure(exc: ModelgridError) -> Failure:
    status = 413 if isinstance(exc, oip_json.PayloadTooLarge) else HTTP_STATUS.get(status_of(exc), 500)
    return Failure(status, str(exc))


def match(path: str) -> tuple[str, str, str] | None:
    """(route, model name, version) of a /v2 path; route is live, ready, server, metadata, model_ready or infer.
    None when the path names no route."""
    parts = path.rstrip("/").split("/")[1:] if path != "/" else []
    if parts == ["v2"]:
        return "server", "", ""
    if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
        return parts[2], "", ""
    if len(parts) < 3 or parts[:2] != ["v2", "models"] or not parts[2]:
        return None
    name, rest, version = parts[2], parts[3:], ""
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    if not rest:
        return "metadata", name, version
    if rest in (["ready"], ["infer"]):
        return {"ready": "model_ready", "infer": "infer"}[rest[0]], name, version
    return None


_METHOD = {
    "server": "ServerMetadata",
    "live": "ServerLive",
    "ready": "ServerReady",
    "metadata": "ModelMetadata",
    "model_ready": "ModelReady",
    "infer": "ModelInfer",
}


class OipRestFront:
    """Serves the /v2 routes of the web port (the host and origin checks are the web app's, before this)."""

    def __init__(self, settings: GatewaySettings, forwarder: Forwarder, authorizer: Authorizer) -> None:
        self._forwarder = forwarder
        self._authorizer = authorizer
        # No body bigger than its JSON and its binary data can be can make a call: it is refused while it comes.
        self._max_body = min(
            settings.web_max_body_bytes, settings.oip_rest_max_json_bytes + settings.max_send_message_bytes
        )
        self._body_timeout = settings.web_body_timeout_seconds
        self._drain_seconds = min(BODY_DRAIN_SECONDS, settings.web_body_timeout_seconds)
        self._timeout = settings.oip_rest_timeout_seconds
        self._limits = oip_json.JsonLimits(
            settings.oip_rest_max_json_bytes, settings.oip_rest_max_json_values, settings.max_send_message_bytes
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        http1 = scope.get("http_version", "1.1").startswith("1")
        body_done = False  # the request body has been read to its end (else an early answer drains it)
        try:
            route = match(scope["path"])
            if route is None:
                raise Failure(404, f"no KServe v2 route {scope['path'][:128]!r}")
            kind, model, version = route
            allowed = ("POST",) if kind == "infer" else ("GET", "HEAD")
            if scope["method"] not in allowed:
                allow = ", ".join(allowed)
                raise Failure(405, f"{scope['path'][:128]} takes {allow}", [(b"allow", allow.encode())])
            method = SERVICE + _METHOD[kind]
            metadata = await self._authorize(method, headers)
            body = b""
            if kind == "infer":
                body = await self._read(receive)
            body_done = True
            await self._serve(kind, model, version, method, metadata, body, headers, receive, send)
        except ClientGone:
            return
        except Failure as failure:
            drained = body_done or (failure.drain and await drain_body(receive, self._drain_seconds))
            extra = [(b"connection", b"close")] if http1 and not drained else []
            await _json(send, failure.status, {"error": str(failure)}, [*failure.headers, *extra])
        except Exception:  # noqa: BLE001 - never a traceback to the client: an incident id, the details in the log
            incident = uuid.uuid4().hex[:12]
            logger.exception("KServe v2 REST call failed (incident %s)", incident)
            close = [(b"connection", b"close")] if http1 and not body_done else []
            await _json(
                send, 500, {"error": f"internal error (incident {incident}); the server log has details"}, close
            )

    async def _authorize(self, method: str, headers: dict[str, str]) -> list[tuple[str, str | bytes]]:
        """The metadata to forward if the caller's key may make this call now (as on the other fronts)."""
        metadata = grpcweb.request_metadata((k, v) for k, v in headers.items() if k not in _REST_HEADERS)
        try:
            identity = await self._authorizer.check(method, metadata)
        except ModelgridError as exc:
            raise _failure(exc) from None
        return self._forwarder.request_metadata(metadata, identity.name)

    async def _read(self, receive: Receive) -> bytes:
        """The whole request body, within the body limit and without stalling past web_body_timeout_seconds."""
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(self._body_timeout):
                    event = await receive()
            except TimeoutError:
                message = f"the request body stalled: no data for {self._body_timeout:g} s"
                raise Failure(408, message, drain=False) from None
            if event["type"] == "http.disconnect":
                raise ClientGone
            size += len(event.get("body", b""))
            if size > self._max_body:
                settings = (
                    "MODELGRID_GATEWAY_WEB_MAX_BODY_BYTES, at most _OIP_REST_MAX_JSON_BYTES + _MAX_SEND_MESSAGE_BYTES"
                )
                raise Failure(413, f"the request body exceeds the limit of {self._max_body} bytes ({settings})")
            chunks.append(event.get("body", b""))
            if not event.get("more_body", False):
                return b"".join(chunks)

    async def _serve(self, kind, model, version, method, metadata, body, headers, receive, send) -> None:
        if kind == "infer":
            call, request = await self._parse(body, headers, model, version)
        else:
            messages = oip_json.messages()
            request = {
                "server": messages.ServerMetadataRequest(),
                "live": messages.ServerLiveRequest(),
                "ready": messages.ServerReadyRequest(),
                "metadata": messages.ModelMetadataRequest(name=model, version=version),
                "model_ready": messages.ModelReadyRequest(name=model, version=version),
            }[kind].SerializeToString()
        reply = await self._forward(method, metadata, request, receive)
        if type(reply) is End:
            raise Failure(HTTP_STATUS.get(reply.code, 500), reply.details or reply.code.name)
        messages = oip_json.messages()
        if kind == "infer":
            return await self._infer_answer(send, messages.ModelInferResponse.FromString(reply.response), call)
        if kind == "server":
            return await _json(
                send, 200, oip_json.server_metadata(messages.ServerMetadataResponse.FromString(reply.response))
            )
        if kind == "metadata":
            document = oip_json.model_metadata(messages.ModelMetadataResponse.FromString(reply.response))
            return await _json(send, 200, document)
        if kind == "live":
            live = messages.ServerLiveResponse.FromString(reply.response).live
            return await _json(send, 200 if live else 503, {"live": live})
        parse = messages.ServerReadyResponse if kind == "ready" else messages.ModelReadyResponse
        ready = parse.FromString(reply.response).ready
        await _json(send, 200 if ready else 503, {"ready": ready})

    async def _parse(self, body: bytes, headers: dict[str, str], model: str, version: str):
        """(InferCall, serialized request) of an infer body (inflated first if it came compressed); a big one is
        parsed in a thread, so the event loop keeps serving other calls meanwhile."""
        encoding = headers.get("content-encoding", "identity")

        def parse():
            data = body
            if encoding.strip().lower() != "identity":
                data = oip_json.decompress(body, encoding, self._max_body)
            call = oip_json.parse_infer(data, headers.get(HEADER_LENGTH), model, version, self._limits)
            return call, oip_json.check_forwardable(call.request, self._limits)

        try:
            small = len(body) < OFF_LOOP_BYTES and encoding.strip().lower() == "identity"
            return parse() if small else await asyncio.to_thread(parse)
        except ModelgridError as exc:
            raise _failure(exc) from None
        except UnicodeError:  # JSON may hold lone UTF-16 surrogates ("\ud800"), which are no text to forward
            raise Failure(400, "the request's JSON holds a string that is not valid Unicode text") from None

    async def _forward(self, method: str, metadata, request: bytes, receive: Receive):
        """The Forwarder's answer to one unary call, cancelled if the client goes away first."""
        forward = asyncio.create_task(self._forwarder.unary(method, metadata, self._timeout, request))
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({forward, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not forward.done():
                raise ClientGone  # cancelling the forward (below) cancels the upstream call
            return forward.result()
        finally:
            forward.cancel()
            gone.cancel()

    async def _infer_answer(self, send: Send, response, call: oip_json.InferCall) -> None:
        def write() -> tuple[bytes, int | None]:
            return oip_json.infer_response(response, call, self._limits.max_json_values)

        try:
            # Writing a big answer as JSON takes long (about a second per million numbers): not on the event loop.
            small = sum(len(raw) for raw in response.raw_output_contents) < OFF_LOOP_BYTES
            body, json_length = write() if small else await asyncio.to_thread(write)
        except ModelgridError as exc:
            raise _failure(exc) from None
        except ValueError:
            incident = uuid.uuid4().hex[:12]
            logger.exception("a predictor's ModelInfer answer cannot be written as REST (incident %s)", incident)
            raise Failure(500, f"internal error (incident {incident}); the server log has details") from None
        if json_length is None:
            return await _send(send, 200, body, b"application/json")
        await _send(send, 200, body, b"application/octet-stream", [(HEADER_LENGTH.encode(), str(json_length).encode())])


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (the body has been read: only http.disconnect comes next)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send: Send, status: int, body: bytes, content_type: bytes, extra=()) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, document: dict, extra=()) -> None:
    await _send(send, status, json.dumps(document, separators=(",", ":")).encode(), b"application/json", extra)
