"""Channels to modelgrid: the gateway's public port (plaintext or TLS) with an API key on every call, and gRPC's own
retries, with exponential backoff, for the calls that are safe to repeat.

    channel = connect("gateway.example:8080", api_key=key, tls=True)          # blocking stubs and clients
    channel = aio_connect("127.0.0.1:8080", api_key=key)                      # asyncio stubs and clients

Only idempotent calls are retried (reads, inference, which changes nothing), and only on UNAVAILABLE: the call did
not reach a server, or the server was shutting down. A call that changes state (create, submit, cancel, move an
alias) is never repeated by the client; the registry's uploads resume by themselves and submissions take a request
id for that.
"""

import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message either way by default: the gateway's own default limit."""
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"

IDEMPOTENT: dict[str, tuple[str, ...]] = {
    "modelgrid.registry.v1.ModelRegistry": (
        "GetModel",
        "ListModels",
        "GetVersion",
        "ListVersions",
        "Resolve",
        "GetHistory",
        "DownloadArtifact",
        "StatUpload",
        "StatBlob",
        "DownloadBlob",
    ),
    "modelgrid.predictor.v1.Predictor": ("Predict", "GetBatchJob", "ListBatchJobs", "GetModelMetadata", "ListModels"),
    "inference.GRPCInferenceService": (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "RepositoryIndex",
    ),
    "modelgrid.trainer.v1.Trainer": ("GetJob", "ListJobs", "GetJobLogs", "ListWorkers"),
    "modelgrid.gateway.v1.GatewayAdmin": ("ListApiKeys", "GetRoutes"),
}
"""The calls a client may repeat without changing the outcome, by gRPC service: what `Retry` applies to."""


@dataclass(frozen=True)
class Retry:
    """gRPC's retry policy for the `IDEMPOTENT` calls: up to `attempts` tries in all, the n-th retry after a random
    wait of up to min(initial * multiplier**(n-1), maximum) seconds. `attempts=1` turns retries off."""

    attempts: int = 4
    initial_backoff: float = 0.1
    maximum_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 5:
            raise ValueError("Retry.attempts must be between 1 and 5 (gRPC caps retries at 5 tries)")
        if not 0.001 <= self.initial_backoff <= self.maximum_backoff <= 3600 or not 1 <= self.multiplier <= 10:
            raise ValueError(
                "Retry needs 0.001 <= initial_backoff <= maximum_backoff <= 3600 (seconds) and 1 <= multiplier <= 10"
            )

    def service_config(self) -> str:
        """The channel's service config (JSON) that carries this policy."""
        names = [
            {"service": service, "method": method} for service, methods in IDEMPOTENT.items() for method in methods
        ]
        config: dict[str, Any] = {"name": names}
        if self.attempts > 1:
            config["retryPolicy"] = {
                "maxAttempts": self.attempts,
                "initialBackoff": f"{self.initial_backoff:.3f}s",  # a protobuf Duration: no exponent
                "maxBackoff": f"{self.maximum_backoff:.3f}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return json.dumps({"methodConfig": [config]})


def channel_options(retry: Retry | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Channel arguments of every modelgrid channel: message size limits and the retry policy."""
    retry = retry or Retry()
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retry.attempts > 1 else 0),
        ("grpc.service_config", retry.service_config()),
    ]


def public_tls(ca: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a gateway's public port: trusting the PEM certificates in `ca` (a private CA), or without
    one the system's roots (those OpenSSL uses, so a CA the machine's administrator added counts; gRPC's own bundle
    when the system has none). ValueError when `ca` holds no certificate."""
    if ca:
        roots = Path(ca).read_bytes()
        if PEM_CERTIFICATE not in roots:
            raise ValueError(f"{ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        return grpc.ssl_channel_credentials(roots)
    paths = ssl.get_default_verify_paths()
    system = paths.cafile or paths.openssl_cafile
    return grpc.ssl_channel_credentials(Path(system).read_bytes() if system and Path(system).is_file() else None)


def _key_header(api_key: str) -> tuple[str, str]:
    if not api_key or any(c.isspace() for c in api_key):
        raise ValueError("an API key is a non-empty string without spaces")
    return ("authorization", f"Bearer {api_key}")


class ApiKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call of a blocking channel (`grpc.intercept_channel`)."""

    def __init__(self, api_key: str) -> None:
        self._header = _key_header(api_key)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _AioApiKey:
    """The same header on every call of an asyncio channel."""

    def __init__(self, api_key: str) -> None:
        self._header = _key_header(api_key)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioUnaryUnary(_AioApiKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioApiKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioApiKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


class _AioStreamStream(_AioApiKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


def _channel_args(
    tls: bool, ca: str | Path | None, retry: Retry | None, max_message_bytes: int, options: Sequence[tuple[str, Any]]
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """The TLS credentials (None: plaintext) and channel options of `connect` and `aio_connect`."""
    if ca and not tls:
        raise ValueError("ca is for TLS: pass tls=True with it")
    return public_tls(ca) if tls else None, [*channel_options(retry, max_message_bytes), *options]


def connect(
    target: str,
    *,
    api_key: str = "",
    tls: bool = False,
    ca: str | Path | None = None,
    retry: Retry | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel to `target` ("host:port" of a gateway, or of a service on a trusted network): TLS when
    `tls` (with `ca`, a PEM file, for a private CA), every call carrying `api_key` when one is given. Close it, or
    use it in a `with` block."""
    credentials, all_options = _channel_args(tls, ca, retry, max_message_bytes, options)
    interceptor = ApiKey(api_key) if api_key else None  # a bad key is refused before a channel exists
    if credentials is None:
        channel = grpc.insecure_channel(target, options=all_options)
    else:
        channel = grpc.secure_channel(target, credentials, options=all_options)
    return grpc.intercept_channel(channel, interceptor) if interceptor else channel


def with_api_key(channel: grpc.Channel, api_key: str) -> grpc.Channel:
    """`channel` with `authorization: Bearer <api_key>` on every call (the channel itself when there is no key)."""
    return grpc.intercept_channel(channel, ApiKey(api_key)) if api_key else channel


def aio_connect(
    target: str,
    *,
    api_key: str = "",
    tls: bool = False,
    ca: str | Path | None = None,
    retry: Retry | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """`connect` for asyncio: a grpc.aio channel (`await channel.close()`, or `async with`)."""
    credentials, all_options = _channel_args(tls, ca, retry, max_message_bytes, options)
    interceptors = (
        [cls(api_key) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
        if api_key
        else None
    )
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=all_options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=all_options, interceptors=interceptors)


ChannelSource = grpc.aio.Channel | Callable[[], grpc.aio.Channel] | Any
"""An asyncio channel, a callable that returns one per call, or an object whose `channel()` does (a pool)."""


def channel_picker(source: ChannelSource) -> Callable[[], grpc.aio.Channel]:
    """A callable returning the channel for the next call from any `ChannelSource`."""
    if isinstance(source, grpc.aio.Channel):
        return lambda: source
    pick = getattr(source, "channel", None)
    if callable(pick):
        return pick
    if callable(source):
        return source
    raise TypeError("expected a grpc.aio.Channel, a callable returning one, or an object with a channel() method")
