"""The gRPC-Web front: an ASGI app served by hypercorn (HTTP/1.1, h2c and, with a certificate, TLS with ALPN h2)
that translates gRPC-Web calls to the forwarding core, answers CORS preflights, serves the web console, and hands
/v2 to the KServe v2 REST front (oip_rest.py) after the same Host and Origin checks.

POST /<package.Service>/<Method> with `application/grpc-web[+proto]` or `application/grpc-web-text[+proto]`:
the body's frames become the call's messages, `grpc-timeout` its deadline; the answer's headers carry the call's
response metadata, the body its messages and, always last, a trailer frame with grpc-status and grpc-message (also
when the call fails before any response, so that every client reads the status from one place).

What the port accepts: a request whose Host is not allow-listed (`web_allowed_hosts`, the gateway's own addresses)
gets 421 before any routing, so that a page on another name resolving to this address (DNS rebinding) reaches
nothing, and a browser's same-origin call is one whose Origin is exactly the allow-listed Host. A request body must
keep coming (`web_body_timeout_seconds` between its bytes), stay under `web_max_body_bytes` and hold at least one
whole message frame (exactly one for a method that takes one request: unary and server streaming): otherwise the
trailers say DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or INVALID_ARGUMENT. A streaming call counts against its
caller's open streams, with those of the native port (`max_streams_per_caller`).
"""

import asyncio
import contextlib
import ipaddress
import logging
import mimetypes
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from hypercorn.asyncio import serve
from hypercorn.config import Config
from redis.exceptions import RedisError

from modelgrid.client.errors import ModelgridError
from services.gateway import grpcweb
from services.gateway.admin import LocalAdminCalls
from services.gateway.asgi import BODY_DRAIN_SECONDS, Receive, Scope, Send, drain_body
from services.gateway.auth import Authorizer
from services.gateway.oip_rest import OipRestFront
from services.gateway.proxy import End, Forwarder, Headers
from services.gateway.settings import GatewaySettings
from services.kit.interceptors import status_of
from services.kit.redis_client import is_outage

logger = logging.getLogger(__name__)


ALLOWED_HEADERS = "x-grpc-web, content-type, authorization, x-api-key, x-user-agent, grpc-timeout, x-modelgrid-client"
EXPOSED_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin"]
NOT_BUILT_PAGE = b"<!doctype html><title>modelgrid</title><p>The web console is not built: run <code>make web</code>."
HOST_REFUSED = b"unknown host: the gateway answers only the hosts in MODELGRID_GATEWAY_WEB_ALLOWED_HOSTS\n"
_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_UNSPECIFIED = frozenset({"", "auto", "0.0.0.0", "::", "[::]"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header value (or allow-list entry) as (lower-case name or [IPv6], port or None); None if malformed.
    A bare IPv6 address is taken as an address (allow-list entries), a trailing dot of a name is dropped."""
    value = value.strip().lower()
    port = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1 :] and not value[end + 1 :].startswith(":")):
            return None
        name, port = value[1:end], value[end + 2 :]
        try:
            name = f"[{ipaddress.IPv6Address(name).compressed}]"
        except ValueError:
            return None
    elif value.count(":") > 1:
        try:
            name = f"[{ipaddress.IPv6Address(value).compressed}]"
        except ValueError:
            return None
    else:
        name, _, port = value.partition(":")
        name = name[:-1] if name.endswith(".") else name
        if not _NAME.match(name):
            return None
    if port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        return None
    return name, int(port) if port else None


class HostAllowList:
    """The Host header values the web port answers (see GatewaySettings.web_allowed_hosts)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.any = False
        self._names: set[str] = set()  # any port
        self._authorities: set[tuple[str, int]] = set()  # that port only
        for entry in entries:
            if entry.strip() == "*":
                self.any = True
                continue
            if entry.strip().lower() in _UNSPECIFIED:
                continue
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"web_allowed_hosts: {entry!r} is not a host name, address or host:port")
            name, port = parsed
            if port is None:
                self._names.add(name)
            else:
                self._authorities.add((name, port))

    @classmethod
    def of(cls, settings: GatewaySettings) -> "HostAllowList":
        """The configured hosts and the gateway's own addresses (its advertise host and its bind host)."""
        return cls([*settings.web_allowed_hosts, settings.advertise_host, settings.host])

    def allows(self, host: str | None) -> bool:
        if self.any:
            return True
        parsed = None if not host else split_host(host)
        if parsed is None or (host.count(":") > 1 and not host.lstrip().startswith("[")):
            return False  # a Host header carries an IPv6 address in brackets, always
        return parsed[0] in self._names or parsed in self._authorities


@dataclass(frozen=True, slots=True)
class BodyFailure:
    """Why a request body cannot make a call: the status the call ends with."""

    code: grpc.StatusCode
    message: str


class _Body:
    """Owns `receive()`: turns the request body into messages (`messages()`), then watches for the client going
    away. `aborted` completes with None on a disconnect or with a BodyFailure: a malformed, truncated or empty
    body (INVALID_ARGUMENT), one too big (RESOURCE_EXHAUSTED) or one that stalled (DEADLINE_EXCEEDED).

    The body is always read to its end, also when the call no longer wants it: hypercorn 0.18's HTTP/2 drops the
    whole connection when DATA comes for a stream whose response has ended, so `finish()` waits for the end of the
    body before the response's last bytes go out. Not so for a body that stalls or is too big: reading stops."""

    def __init__(self, receive: Receive, text: bool, *, timeout: float, max_bytes: int, max_message_bytes: int) -> None:
        self._receive = receive
        self._decoder = grpcweb.FrameDecoder(text=text, max_message_bytes=max_message_bytes)
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._size = 0
        self._frames = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        self._wanted = True
        self.complete = False
        """The body came to its end (`received` is also set when reading stopped early)."""
        self.received = asyncio.Event()
        self.aborted: asyncio.Future[BodyFailure | None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        more, failed = True, False
        while more:
            try:
                async with asyncio.timeout(self._timeout):  # between two pieces, not for the whole body
                    event = await self._receive()
            except TimeoutError:
                self.received.set()  # nothing more is read: finish() does not wait for it
                seconds = f"{self._timeout:g}"
                return self._abort(
                    BodyFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"the request body stalled: no data for {seconds} s")
                )
            if event["type"] == "http.disconnect":
                self.received.set()
                return self._abort(None)
            more = event.get("more_body", False)
            data = event.get("body", b"")
            self._size += len(data)
            if self._size > self._max_bytes:
                self.received.set()
                message = f"the request body exceeds the limit of {self._max_bytes} bytes"
                return self._abort(BodyFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
            if not failed:
                try:
                    await self._take(data, last=not more)
                except grpcweb.FrameError as exc:
                    failed = True
                    # the message stream stays open: the call is cancelled, not truncated
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, grpcweb.FrameTooLarge) else None
                    self._abort(BodyFailure(code or grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        self.complete = True
        self.received.set()
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._abort(None)

    async def _take(self, data: bytes, *, last: bool) -> None:
        for frame in self._decoder.feed(data):
            if frame.flags != grpcweb.MESSAGE_FLAG:
                raise grpcweb.FrameError(f"unsupported request frame flags 0x{frame.flags:02x}")
            self._frames += 1
            if self._wanted:
                await self._queue.put(frame.payload)
        if last:
            self._decoder.close()
            if not self._frames:
                raise grpcweb.FrameError(
                    "the request body is empty: a gRPC-Web call sends its request message as a frame "
                    "(5-byte header, then the message)"
                )
            if self._wanted:
                await self._queue.put(None)

    def _abort(self, reason: BodyFailure | None) -> None:
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


class _Reply:
    """Writes one gRPC-Web response: headers when the first frame comes, messages, then the trailer frame."""

    def __init__(
        self, send: Send, body: _Body, content_type: str, text: bool, cors: list[tuple[bytes, bytes]], http1: bool
    ) -> None:
        self._send = send
        self._body = body
        self._content_type = content_type
        self._text = text
        self._cors = cors
        self._http1 = http1
        self.started = False
        self.ended = False

    async def start(self, metadata=(), *, close: bool = False) -> None:
        if self.started:
            return
        self.started = True
        headers = [(b"content-type", self._content_type.encode()), *self._cors]
        if close and self._http1:
            headers.append((b"connection", b"close"))
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
            # a body not read to its end (stalled, too big, still coming): the connection cannot serve another request
            await self.start(close=not self._body.complete)
            await self.write(grpcweb.encode_trailers(code.value[0], details, trailers), last=True)


class GrpcWebApp:
    """The ASGI application of the web port."""

    def __init__(
        self,
        settings: GatewaySettings,
        forwarder: Forwarder,
        authorizer: Authorizer,
        admin: LocalAdminCalls | None = None,
    ) -> None:
        """`admin`: the gateway's own API (GatewayAdmin), answered here in-process; None: UNIMPLEMENTED."""
        self._settings = settings
        self._admin = admin
        self._forwarder = forwarder
        self._authorizer = authorizer
        self._origins = set(settings.cors_origins)
        self._hosts = HostAllowList.of(settings)
        self._body_timeout = settings.web_body_timeout_seconds
        self._drain_seconds = min(BODY_DRAIN_SECONDS, settings.web_body_timeout_seconds)
        self._max_body = settings.web_max_body_bytes
        self._max_message = settings.max_receive_message_bytes
        self._web_dir = Path(settings.web_dir).resolve()
        self._oip_rest = OipRestFront(settings, forwarder, authorizer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"]
        if len(hosts) != 1 or not self._hosts.allows(hosts[0]):
            logger.debug("refused a request for host %r", hosts)
            return await self._early(scope, receive, send, 421, HOST_REFUSED)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS":
            return await self._preflight(scope, headers, send)
        if path == "/v2" or path.startswith("/v2/"):
            # KServe v2 REST (oip_rest.py); from a browser, only allowed origins
            origin = headers.get("origin")
            if origin is not None and not self._origin_allowed(origin, scope, headers):
                return await self._early(scope, receive, send, 403, b"origin not allowed\n")
            return await self._oip_rest(scope, receive, send, headers)
        if method == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            kind, _, codec = content_type.partition("+")
            if kind not in ("application/grpc-web", "application/grpc-web-text") or codec not in ("", "proto"):
                message = b"expected application/grpc-web[+proto] or grpc-web-text[+proto]\n"
                return await self._early(scope, receive, send, 415, message)
            if path.count("/") != 2 or len(path) < 4:
                return await self._early(scope, receive, send, 404, b"not a gRPC method path\n")
            origin = headers.get("origin")
            if origin is not None and not self._origin_allowed(origin, scope, headers):
                return await self._early(scope, receive, send, 403, b"origin not allowed\n")
            return await self._call(scope, receive, send, headers, content_type, origin)
        if method in ("GET", "HEAD"):
            return await self._static(path, send)  # hypercorn leaves out the body of a HEAD answer
        await _plain(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD, POST, OPTIONS")])

    async def _early(self, scope: Scope, receive: Receive, send: Send, status: int, message: bytes) -> None:
        """A plain answer before the call: what is left of the body is read first (a bounded time, see _Body)."""
        drained = await drain_body(receive, self._drain_seconds)
        close = [(b"connection", b"close")] if not drained and scope.get("http_version", "1.1").startswith("1") else []
        await _plain(send, status, message, close)

    # -- CORS ------------------------------------------------------------------------------------------------

    def _origin_allowed(self, origin: str, scope: Scope, headers: dict[str, str]) -> bool:
        """An origin in cors_origins ("*": any), or the same origin: the page came from the allow-listed host this
        request is for (the Host header alone says nothing: a DNS rebinding page sends its own name in both)."""
        if "*" in self._origins or origin in self._origins:
            return True
        host = headers.get("host", "")
        return origin.lower() == f"{scope['scheme']}://{host}".lower() and self._hosts.allows(host)

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
        body = _Body(
            receive, text, timeout=self._body_timeout, max_bytes=self._max_body, max_message_bytes=self._max_message
        )
        http1 = scope.get("http_version", "1.1").startswith("1")
        reply = _Reply(send, body, content_type, text, self._cors(origin), http1)
        try:
            timeout = grpcweb.parse_timeout(headers.get("grpc-timeout"))
        except grpcweb.FrameError as exc:
            await reply.end(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return body.close()
        peer = (scope.get("client") or ("",))[0]
        relay = asyncio.create_task(self._relay(scope["path"], headers, timeout, body, reply, peer))
        try:
            done, _ = await asyncio.wait({relay, body.aborted}, timeout=timeout, return_when="FIRST_COMPLETED")
            if relay in done:
                return await self._finish(relay, reply)
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            if not done:
                await reply.end(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            elif (failure := body.aborted.result()) is not None:
                await reply.end(failure.code, failure.message)
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

    async def _relay(
        self, method: str, headers: dict[str, str], timeout: float | None, body: _Body, reply: _Reply, peer: str
    ):
        metadata = grpcweb.request_metadata(headers.items())
        if self._admin is not None and self._admin.handles(method):
            return await self._admin_call(method, metadata, body, reply)
        forwarder = self._forwarder
        route = forwarder.route(method)
        slot = None
        try:
            identity = await self._authorizer.check(method, metadata)
            if route is not None and not route.unary:
                slot = self._authorizer.open_stream(identity, peer)  # given back below, or when the relay is cancelled
        except ModelgridError as exc:
            return await reply.end(status_of(exc), str(exc))
        try:
            metadata = forwarder.request_metadata(metadata, identity.name)
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
                requests = _chain([m for m in (first, second) if m is not None], requests)  # the forwarder refuses it
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
        finally:
            if slot is not None:
                slot.close()

    async def _admin_call(self, method: str, metadata, body: _Body, reply: _Reply) -> None:
        """A GatewayAdmin call (unary: exactly one request message); its servicer checks the key."""
        requests = body.messages()
        first = await anext(requests, None)
        if first is None or await anext(requests, None) is not None:
            return await reply.end(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes exactly one request message")
        try:
            response = await self._admin.call(method, metadata, first)
        except ModelgridError as exc:
            return await reply.end(status_of(exc), str(exc))
        except RedisError as exc:  # the key store: as the native port's interceptor answers
            if not is_outage(exc):
                raise
            return await reply.end(grpc.StatusCode.UNAVAILABLE, "the gateway's key store (Redis) is unavailable")
        await reply.start()
        await reply.write(grpcweb.encode_message(response))
        await reply.end(grpc.StatusCode.OK, "")

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


def _listening_socket(host: str, port: int, shared: bool = False) -> socket.socket:
    """`shared`: the port of a multi-process replica, bound by every worker (kit.replica)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)  # connections made before hypercorn accepts wait in the backlog
    return sock


def _log_failure(server: asyncio.Task) -> None:
    if not server.cancelled() and server.exception() is not None:
        logger.error("the web front stopped", exc_info=server.exception())


async def start_web_front(
    settings: GatewaySettings, forwarder: Forwarder, authorizer: Authorizer, admin: LocalAdminCalls | None = None
) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Starts the web port on this event loop; returns its bound port and the coroutine function that stops it.
    `admin`: the gateway's own API, for the console's API keys and routes pages (None: not on this port)."""
    config = Config()
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    config.include_server_header = False
    config.graceful_timeout = settings.shutdown_grace_seconds
    tls = bool(settings.tls_cert and settings.tls_key)
    if tls:
        config.certfile, config.keyfile = str(settings.tls_cert), str(settings.tls_key)
        config.create_ssl_context()  # a bad certificate fails the start, not the first connection
    sock = _listening_socket(settings.host, settings.web_port, shared=settings.is_worker)
    port = sock.getsockname()[1]
    config.bind = [f"fd://{sock.detach()}"]
    shutdown = asyncio.Event()
    server = asyncio.create_task(
        serve(GrpcWebApp(settings, forwarder, authorizer, admin), config, shutdown_trigger=shutdown.wait)
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
