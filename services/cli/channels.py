"""Channels of the command line: gRPC to the gateway (plaintext, or TLS when its public ports have a certificate),
or mTLS to a service inside the mesh; with the API key (when one is set, or the local gateway's admin key) on every
call. The key header, TLS credentials and retry options are the client library's (modelgrid.client.channels)."""

import grpc

from modelgrid.client.channels import public_tls, with_api_key
from services.kit import tls
from services.kit.processes import REPO_ROOT

__all__ = ["local_admin_key", "open_channel", "public_tls"]

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


def open_channel(
    target: str,
    options: list[tuple[str, object]],
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
    return with_api_key(channel, api_key)
