"""How many streaming calls each caller holds open through a gateway instance.

A streaming call (server, client or bidirectional streaming: a watch, an upload, a download, a stream of
predictions) holds a backend's resources as long as it is open; the backends bound their watch streams in total,
not per caller. Here each caller (its API key, or its address when auth is off) may hold at most a number of them
open at once, across both fronts; the next one is refused with RESOURCE_EXHAUSTED at once. A slot is given back
when the call ends, whichever way it ends (completion, error, deadline, the client cancelling or going away).
The count is per gateway instance: it lives in this process, so a gateway that dies takes its slots with it.
"""

import ipaddress
from typing import Self
from urllib.parse import unquote

from modelgrid.client.errors import ResourceExhausted

SETTING = "MODELGRID_GATEWAY_MAX_STREAMS_PER_CALLER"
"""The setting a refused caller is told about."""


class StreamSlot:
    """One open streaming call's place in its caller's count; `close()` gives it back (once, however often it is
    called: the fronts close it from the call's end and from its done callback, whichever comes first)."""

    __slots__ = ("_streams", "_owner", "closed")

    def __init__(self, streams: "OpenStreams", owner: str) -> None:
        self._streams = streams
        self._owner = owner
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._streams._release(self._owner)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OpenStreams:
    """Counts the open streaming calls of each caller; `open()` refuses one past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}  # owner -> open streams (owners with none are not kept)

    def open(self, owner: str, who: str) -> StreamSlot:
        """A slot for one more streaming call of `owner` (an opaque key), or ResourceExhausted naming `who` (how
        the caller is told who it is: never a secret) when it holds `limit` of them already."""
        count = self._open.get(owner, 0)
        if count >= self.limit:
            raise ResourceExhausted(
                f"{who} has {count} streaming calls open on this gateway, the most one caller may hold (the setting "
                f"{SETTING} raises it): close one (a watch, an upload, a download, a prediction stream) or retry later"
            )
        self._open[owner] = count + 1
        return StreamSlot(self, owner)

    def held(self, owner: str) -> int:
        """How many streaming calls `owner` holds open now."""
        return self._open.get(owner, 0)

    @property
    def total(self) -> int:
        """Streaming calls open now, all callers together."""
        return sum(self._open.values())

    def _release(self, owner: str) -> None:
        count = self._open.get(owner, 0) - 1
        if count > 0:
            self._open[owner] = count
        else:
            self._open.pop(owner, None)


def peer_host(peer: str | None) -> str:
    """The address part of a caller's peer ("ipv4:198.18.0.7:51234", "ipv6:[::1]:51234", "198.18.0.7" or a unix socket
    path): a caller that opens a new connection per call is still one caller."""
    if not peer:
        return "unknown"
    peer = unquote(peer)  # grpc-core writes "ipv6:%5B::1%5D:51234"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        peer = rest
    elif kind in ("unix", "unix-abstract"):
        return peer
    if peer.startswith("["):
        return peer[1 : peer.find("]")] if "]" in peer else peer
    try:
        return str(ipaddress.ip_address(peer))  # a bare address (the web front's ASGI client host)
    except ValueError:
        pass
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer
