"""The status a backend ended an upstream streaming call with, kept safe from grpc.aio's own INTERNAL.

grpc.aio (seen up to 1.81) sets a call's status to INTERNAL "Internal error from Core" when a write fails, and a
write fails when the backend has just ended the call while request messages were still going out (an upload
whose first message the backend refused, say). That status replaces the backend's, which has come a moment
before (most often) or comes a moment after, and the caller would get INTERNAL instead of the backend's answer.
grpc.aio calls a call's done callbacks each time it sets a status, so `BackendStatus` sees both and keeps the
backend's.
"""

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import grpc

logger = logging.getLogger(__name__)

WRITE_FAILED = "Internal error from Core"
"""The details grpc.aio gives the INTERNAL status it makes up for a failed write (AioCall.set_internal_error)."""
WAIT_SECONDS = 5.0
"""Longest wait for the backend's status once grpc.aio has reported a failed write in its place (it comes right
after; grpc-core always ends a call with a status)."""


def made_up(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a status is grpc.aio's INTERNAL for a failed write rather than the backend's."""
    return code == grpc.StatusCode.INTERNAL and details == WRITE_FAILED


def _result(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """The value of a coroutine that does not suspend (a finished call's code(), details(), trailing_metadata())."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("the call's status is not set")


class BackendStatus:
    """Records the last status of `call` that is not grpc.aio's made-up INTERNAL (see the module docstring)."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: tuple = ()
        self._arrived = asyncio.Event()
        call.add_done_callback(self._record)

    def _record(self, call: grpc.aio.Call) -> None:
        try:  # called by grpc's Cython code: nothing may escape
            code, details = _result(call.code()), _result(call.details())
            if made_up(code, details):
                return
            self.code, self.details = code, details or ""
            self.trailers = tuple(_result(call.trailing_metadata()) or ())
            self._arrived.set()
        except Exception:  # noqa: BLE001 - a grpc that works otherwise: the call's own status stands
            logger.debug("cannot read the status of an upstream call", exc_info=True)

    async def wait(self, seconds: float = WAIT_SECONDS) -> bool:
        """Whether the backend's status has come (waiting for it up to `seconds`)."""
        if not self._arrived.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await self._arrived.wait()
            except TimeoutError:
                return False
        return True
