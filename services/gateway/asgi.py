"""What the web port's two HTTP fronts (gRPC-Web in web.py, KServe v2 REST in oip_rest.py) share: the ASGI types and
reading away the rest of a request body before an early answer."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BODY_DRAIN_SECONDS = 10.0
"""Longest time spent reading and dropping the rest of a body that gets an early answer."""


async def drain_body(receive: Receive, seconds: float) -> bool:
    """Reads and drops what is left of a request body before an early answer, for at most `seconds`; whether the body
    came to its end (or the client left). Hypercorn's HTTP/2 drops a connection that sends DATA after its stream's
    answer, so an early answer waits for the body when it can."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while (event := await receive())["type"] == "http.request" and event.get("more_body", False):
                pass
            return True
    return False
