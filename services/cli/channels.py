"""Channels of the command line: gRPC to the gateway (plaintext, or TLS when its public ports have a certificate),
or mTLS to a service inside the mesh; with the API key (when one is set, or the local gateway's admin key) on every
call."""

import collections
import ssl
from pathlib import Path

import grpc

from services.kit import tls
from services.kit.processes import REPO_ROOT


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _ApiKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


LOCAL_ADMIN_KEY = REPO_ROOT / ".run" / "gateway" / "admin-key"
"""The admin key the gateway of `make up` made (mode 0600): the CLI of this checkout uses it for that gateway."""
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def local_admin_key(target: str) -> str:
    """The key of `make up`'s gateway when `target` is on this machine's loopback and the file is readable; else
    "" (a remote gateway never gets this machine's key)."""
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    if host not in LOOPBACK:
        return ""
    try:
        return LOCAL_ADMIN_KEY.read_text().strip()
    except OSError:
        return ""


PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def public_tls(ca: str | None) -> grpc.ChannelCredentials:
    """TLS to a gateway's public port (MODELGRID_GATEWAY_TLS_CERT): trusting the PEM certificates in `ca` (a
    private CA), or without one the system's roots (those OpenSSL uses, so a CA the machine's administrator added
    counts; gRPC's own bundle when the system has none)."""
    if ca:
        roots = Path(ca).read_bytes()
        if PEM_CERTIFICATE not in roots:
            raise ValueError(f"{ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        return grpc.ssl_channel_credentials(roots)
    paths = ssl.get_default_verify_paths()
    system = paths.cafile or paths.openssl_cafile
    return grpc.ssl_channel_credentials(Path(system).read_bytes() if system and Path(system).is_file() else None)


def open_channel(
    target: str,
    options: list[tuple[str, int]],
    api_key: str = "",
    internal: tls.InternalTLS | None = None,
    service: str = "",
    public: grpc.ChannelCredentials | None = None,
) -> grpc.Channel:
    """A channel to `target`: the gateway's public port (plaintext, or TLS with `public`), or with `internal` a
    service inside the mesh over mTLS, which must prove it is `service`. With an API key (else, on this machine's
    loopback, the local admin key), every call carries it."""
    api_key = api_key or local_admin_key(target)
    if public is not None and internal is None:
        channel = grpc.secure_channel(target, public, options=options)
    else:
        channel = tls.dial(target, service, internal, options=options)
    return grpc.intercept_channel(channel, _ApiKey(api_key)) if api_key else channel
