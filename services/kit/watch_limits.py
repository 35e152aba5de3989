"""How many long-lived watch streams a service holds open.

Each open WatchEvents or WatchJob stream keeps one Redis connection in a blocking read. Without a bound, some sixty
of them took the whole connection pool and every other call failed. A stream past the bound is refused at once with
RESOURCE_EXHAUSTED, so the calls that need Redis briefly always find a connection. (Limits per API key belong to the
gateway, which knows the keys.)
"""

import contextlib
from collections.abc import Iterator

import grpc

from modelgrid.client.errors import ResourceExhausted

CLIENT_ID_HEADER = "x-modelgrid-client"


def client_id(context: grpc.aio.ServicerContext) -> str:
    """Who calls: the x-modelgrid-client metadata (the gateway sets it from the API key), else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_HEADER and value:
            return str(value)[:200]
    return context.peer() or "unknown"


class WatchLimits:
    """Counts open streams; `hold()` refuses one past `total`."""

    def __init__(self, total: int, setting_prefix: str) -> None:
        self.total = total
        self.open = 0
        self._setting = f"{setting_prefix}MAX_WATCH_STREAMS"

    @contextlib.contextmanager
    def hold(self, context: grpc.aio.ServicerContext | None = None) -> Iterator[None]:
        """Counts the block as one open stream. With the call's `context`, the place is also given back when the
        call ends: a call the client cancels while its handler waits at a `yield` leaves that handler suspended
        there, its `finally` not run until the garbage collector gets to it, so without this every cancelled
        stream would keep its place for a while."""
        if self.open >= self.total:
            raise ResourceExhausted(
                f"this service holds its limit of {self.total} open watch streams (setting {self._setting}); "
                "close one or retry later"
            )
        self.open += 1
        released = False

        def release(*_: object) -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1

        if context is not None:
            context.add_done_callback(release)
        try:
            yield
        finally:
            release()
