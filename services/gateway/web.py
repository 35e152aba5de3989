"""The gRPC-Web front: an ASGI app served by hypercorn (HTTP/1.1, h2c and, with a certificate, TLS with ALPN h2)
that translates gRPC-Web calls to the forwarding core, answers CORS preflights, and serves the web console.

POST /<package.Service>/<Method> with `application/grpc-web[+proto]` or `application/grpc-web-text[+proto]`:
the body's frames become the call's messages, `grpc-timeout` its deadline; the answer's headers carry the call's
response metadata, the body its messages and, always last, a trailer frame with grpc-status and grpc-message (also
when the call fails before any response, so that every client reads the status from one place).
"""

import asyncio
import contextlib
import logging
import mimetypes
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from hypercorn.asyncio import serve
from hypercorn.config import Config

from services.gateway import grpcweb
from services.gateway.auth import Authorizer
from services.gateway.proxy import End, Forwarder, Headers
from services.gateway.settings import GatewaySettings
from services.kit.errors import ModelgridError
from services.kit.interceptors import status_of

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ALLOWED_HEADERS = "x-grpc-web, content-type, authorization, x-api-key, x-user-agent, grpc-timeout, x-modelgrid-client"
EXPOSED_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin"]
BODY_DRAIN_SECONDS = 10.0
NOT_BUILT_PAGE = b"<!doctype html><title>modelgrid</title><p>The web console is not built: run <code>make web</code>."


class _Body:
    """Owns `receive()`: turns the request body into messages (`messages()`), then watches for the client going
    away. `aborted` completes with None on a disconnect or with a FrameError for a malformed body.

    The body is always read to its end, also when the call no longer wants it: hypercorn 0.18's HTTP/2 drops the
    whole connection when DATA comes for a stream whose response has ended, so `finish()` waits for the end of the
    body before the response's last bytes go out."""

    def __init__(self, receive: Receive, text: bool) -> None:
        self._receive = receive
        self._decoder = grpcweb.FrameDecoder(text=text)
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        self._wanted = True
        self.received = asyncio.Event()
        self.aborted: asyncio.Future[grpcweb.FrameError | None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        more, failed = True, False
        while more:
            event = await self._receive()
            if event["type"] == "http.disconnect":
                self.received.set()
                return self._abort(None)
            more = event.get("more_body", False)
            if not failed:
                try:
                    await self._take(event.get("body", b""), last=not more)
                except grpcweb.FrameError as exc:
                    failed = True
                    self._abort(exc)  # the message stream stays open: the call is cancelled, not truncated
        self.received.set()
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._abort(None)

    async def _take(self, data: bytes, *, last: bool) -> None:
        for frame in self._decoder.feed(data):
            if frame.flags != grpcweb.MESSAGE_FLAG:
                raise grpcweb.FrameError(f"unsupported request frame flags 0x{frame.flags:02x}")
            if self._wanted:
                await self._queue.put(frame.payload)
        if last:
            self._decoder.close()
            if self._wanted:
                await self._queue.put(None)

    def _abort(self, reason: grpcweb.FrameError | None) -> None:
        if not self.aborted.done():
            self.aborted.set_result(reason)

    async def messages(self) -> AsyncIterator[bytes]:
        while (message := await self._queue.get()) is not None:
            yield message

    async def finish(self) -> None:
        """Drops the messages nobody will read and waits (a bounded time) until the whole body has come."""
        self._wanted = False
        while not self._queue.empty():
            self._queue.get_nowait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.received.wait(), BODY_DRAIN_SECONDS)

    def close(self) -> None:
        self._task.cancel()


async def _chain(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for message in first:
        yield message
    async for message in rest:
        yield message


async def _drain(receive: Receive) -> None:
    """Reads and drops what is left of a request body before an early answer (see _Body), a bounded time."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(BODY_DRAIN_SECONDS):
            while (event := await receive())["type"] == "http.request" and event.get("more_body", False):
                pass


class _Reply:
    """Writes one gRPC-Web response: headers when the first frame comes, messages, then the trailer frame."""

    def __init__(self, send: Send, body: _Body, content_type: str, text: bool, cors: list[tuple[bytes, bytes]]) -> None:
        self._send = send
        self._body = body
        self._content_type = content_type
        self._text = text
        self._cors = cors
        self.started = False
        self.ended = False

    async def start(self, metadata=()) -> None:
        if self.started:
            return
        self.started = True
        headers = [(b"content-type", self._content_type.encode()), *self._cors]
        for key, value in metadata:
            headers.append((key.encode(), grpcweb.header_value(key, value).encode("latin-1", "replace")))
        if self._cors:
            exposed = dict.fromkeys([*EXPOSED_HEADERS, *(k for k, _ in metadata)])
            headers.append((b"access-control-expose-headers", ", ".join(exposed).encode()))
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    async def write(self, frame: bytes, *, last: bool = False) -> None:
        await self.start()
        body = grpcweb.text_encode(frame) if self._text else frame
        await self._send({"type": "http.response.body", "body": body, "more_body": not last})

    async def end(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        if not self.ended:
            await self._body.finish()
            self.ended = True
            await self.write(grpcweb.encode_trailers(code.value[0], details, trailers), last=True)


class GrpcWebApp:
    """The ASGI application of the web port."""

    def __init__(self, settings: GatewaySettings, forwarder: Forwarder, authorizer: Authorizer) -> None:
        self._settings = settings
        self._forwarder = forwarder
        self._authorizer = authorizer
        self._origins = set(settings.cors_origins)
        self._web_dir = Path(settings.web_dir).resolve()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS":
            return await self._preflight(scope, headers, send)
        if method == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            kind, _, codec = content_type.partition("+")
            if kind not in ("application/grpc-web", "application/grpc-web-text") or codec not in ("", "proto"):
                await _drain(receive)
                return await _plain(send, 415, b"expected application/grpc-web[+proto] or grpc-web-text[+proto]\n")
            if path.count("/") != 2 or len(path) < 4:
                await _drain(receive)
                return await _plain(send, 404, b"not a gRPC method path\n")
            origin = headers.get("origin")
            if origin is not None and not self._origin_allowed(origin, scope, headers):
                await _drain(receive)
                return await _plain(send, 403, b"origin not allowed\n")
            return await self._call(scope, receive, send, headers, content_type, origin)
        if method in ("GET", "HEAD"):
            return await self._static(path, send)  # hypercorn leaves out the body of a HEAD answer
        await _plain(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD, POST, OPTIONS")])

    # -- CORS ------------------------------------------------------------------------------------------------

    def _origin_allowed(self, origin: str, scope: Scope, headers: dict[str, str]) -> bool:
        same_origin = origin == f"{scope['scheme']}://{headers.get('host', '')}"
        return same_origin or "*" in self._origins or origin in self._origins

    def _cors(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if origin is None:
            return []
        return [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]

    async def _preflight(self, scope: Scope, headers: dict[str, str], send: Send) -> None:
        origin = headers.get("origin")
        if origin is None or not self._origin_allowed(origin, scope, headers):
            return await _plain(send, 403, b"origin not allowed\n")
        requested = headers.get("access-control-request-headers", "")
        allowed = ", ".join(dict.fromkeys(h.strip().lower() for h in f"{ALLOWED_HEADERS},{requested}".split(",")))
        cors = [
            *self._cors(origin),
            (b"access-control-allow-methods", b"POST, OPTIONS"),
            (b"access-control-allow-headers", allowed.strip(", ").encode("latin-1")),
            (b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode()),
            (b"access-control-max-age", b"86400"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": cors})
        await send({"type": "http.response.body", "body": b""})

    # -- calls -----------------------------------------------------------------------------------------------

    async def _call(self, scope: Scope, receive: Receive, send: Send, headers, content_type, origin) -> None:
        text = content_type.startswith("application/grpc-web-text")
        body = _Body(receive, text)
        reply = _Reply(send, body, content_type, text, self._cors(origin))
        try:
            timeout = grpcweb.parse_timeout(headers.get("grpc-timeout"))
        except grpcweb.FrameError as exc:
            await reply.end(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return body.close()
        relay = asyncio.create_task(self._relay(scope["path"], headers, timeout, body, reply))
        try:
            done, _ = await asyncio.wait({relay, body.aborted}, timeout=timeout, return_when="FIRST_COMPLETED")
            if relay in done:
                return await self._finish(relay, reply)
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            if not done:
                await reply.end(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            elif body.aborted.result() is not None:
                await reply.end(grpc.StatusCode.INVALID_ARGUMENT, str(body.aborted.result()))
            # else: the client went away; cancelling the relay cancelled the upstream call
        finally:
            relay.cancel()
            body.close()

    @staticmethod
    async def _finish(relay: asyncio.Task, reply: _Reply) -> None:
        """Ends the response of a relay that returned (normally it has ended it already)."""
        if relay.exception() is not None:
            incident = uuid.uuid4().hex[:12]
            logger.error("gRPC-Web call failed (incident %s)", incident, exc_info=relay.exception())
            details = f"internal error (incident {incident}); the server log has details"
            await reply.end(grpc.StatusCode.INTERNAL, details)
        await reply.end(grpc.StatusCode.UNKNOWN, "the call ended without a status")

    async def _relay(self, method: str, headers: dict[str, str], timeout: float | None, body: _Body, reply: _Reply):
        metadata = grpcweb.request_metadata(headers.items())
        try:
            identity = await self._authorizer.check(method, metadata)
        except ModelgridError as exc:
            return await reply.end(status_of(exc), str(exc))
        forwarder = self._forwarder
        metadata = forwarder.request_metadata(metadata, identity.name)
        route = forwarder.route(method)
        requests = body.messages()
        if route is not None and route.unary:
            first = await anext(requests, None)
            second = None if first is None else await anext(requests, None)
            if first is not None and second is None:  # one message, as a unary call has: a unary upstream call
                result = await forwarder.unary(method, metadata, timeout, first)
                if type(result) is End:
                    return await reply.end(result.code, result.details, result.trailers)
                await reply.start(result.headers)
                await reply.write(grpcweb.encode_message(result.response))
                return await reply.end(grpc.StatusCode.OK, "", result.trailers)
            requests = _chain([m for m in (first, second) if m is not None], requests)  # the backend says what is wrong
        frames = forwarder.stream(method, metadata, timeout, requests)
        try:
            async for frame in frames:
                if type(frame) is bytes:
                    await reply.write(grpcweb.encode_message(frame))
                elif type(frame) is Headers:
                    await reply.start(frame.metadata)
                else:
                    return await reply.end(frame.code, frame.details, frame.trailers)
        finally:
            await frames.aclose()

    # -- console and health ----------------------------------------------------------------------------------

    async def _static(self, path: str, send: Send) -> None:
        if path == "/healthz":
            return await _plain(send, 200, b"ok\n")
        if not self._web_dir.is_dir():
            if path in ("/", "/index.html"):
                return await _plain(send, 200, NOT_BUILT_PAGE, content_type=b"text/html; charset=utf-8")
            return await _plain(send, 404, b"not found\n")
        try:
            file = (self._web_dir / ("index.html" if path == "/" else path.lstrip("/"))).resolve()
            found = file.is_relative_to(self._web_dir) and file.is_file()
        except (OSError, ValueError):
            found = False
        if not found:
            return await _plain(send, 404, b"not found\n")
        data = await asyncio.to_thread(file.read_bytes)
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        cache = b"public, max-age=31536000, immutable" if path.startswith("/assets/") else b"no-cache"
        extra = [(b"cache-control", cache), (b"x-content-type-options", b"nosniff")]
        await _plain(send, 200, data, extra, content_type=kind.encode())


async def _plain(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] = (),
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)  # connections made before hypercorn accepts wait in the backlog
    return sock


def _log_failure(server: asyncio.Task) -> None:
    if not server.cancelled() and server.exception() is not None:
        logger.error("the web front stopped", exc_info=server.exception())


async def start_web_front(
    settings: GatewaySettings, forwarder: Forwarder, authorizer: Authorizer
) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Starts the web port on this event loop; returns its bound port and the coroutine function that stops it."""
    config = Config()
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    config.include_server_header = False
    config.graceful_timeout = settings.shutdown_grace_seconds
    tls = bool(settings.tls_cert and settings.tls_key)
    if tls:
        config.certfile, config.keyfile = str(settings.tls_cert), str(settings.tls_key)
        config.create_ssl_context()  # a bad certificate fails the start, not the first connection
    sock = _listening_socket(settings.host, settings.web_port)
    port = sock.getsockname()[1]
    config.bind = [f"fd://{sock.detach()}"]
    shutdown = asyncio.Event()
    server = asyncio.create_task(
        serve(GrpcWebApp(settings, forwarder, authorizer), config, shutdown_trigger=shutdown.wait)
    )
    server.add_done_callback(_log_failure)
    logger.info("gRPC-Web and console on %s://%s:%d", "https" if tls else "http", settings.host, port)

    async def stop() -> None:
        shutdown.set()
        try:
            await asyncio.wait_for(server, settings.shutdown_grace_seconds + 5)
        except (TimeoutError, asyncio.CancelledError):
            logger.warning("the web front did not stop in time")

    return port, stop
