"""Following a server stream for a process's lifetime: reconnect when it breaks, with backoff and jitter, and a
resync on every (re)connection so that nothing that happened while it was down is missed."""

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from modelgrid.client.errors import ModelgridError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential backoff with jitter: `next()` gives the next wait in seconds, `reset()` starts over."""

    initial: float = 0.5
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each wait is spread by +-jitter of itself, so that many followers do not retry together
    _current: float = field(default=0.0, init=False, repr=False)

    def next(self) -> float:
        self._current = self.initial if not self._current else min(self._current * self.multiplier, self.maximum)
        return self._current * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self._current = 0.0


class StreamFollower(Generic[T]):
    """Runs `open_stream()` -> `on_connect()` -> `on_item(item)` for each item, for as long as it is started.

    When the stream fails (a domain error from a client, LookupError/no instance, or any other error of its
    callbacks, which is logged with its traceback) or ends, it waits `backoff.next()` and opens it again; the
    caller keeps its own cursor, read by `open_stream` each time.
    `ready` is set after the first successful `on_connect`.

    With `resync_seconds`, a stream that delivered nothing for that long is closed and opened again at once (no
    backoff: it did not fail), which runs `on_connect` again: the periodic resync of Kubernetes' informers. It is
    the safety net for what no error reports: a stream left hanging on a connection that died without a word, or
    a change that reached no stream.
    """

    def __init__(
        self,
        name: str,
        open_stream: Callable[[], AsyncIterator[T]],
        on_item: Callable[[T], Awaitable[None]],
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        backoff: Backoff | None = None,
        resync_seconds: float | None = None,
    ) -> None:
        if resync_seconds is not None and resync_seconds <= 0:
            raise ValueError(f"{name}: resync_seconds must be positive, not {resync_seconds}")
        self.name = name
        self._open_stream = open_stream
        self._on_item = on_item
        self._on_connect = on_connect
        self._backoff = backoff or Backoff()
        self._resync_seconds = resync_seconds
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        """Starts following in the background."""
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stops following and waits until it has."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            stream: AsyncIterator[T] | None = None
            try:
                stream = self._open_stream()
                if self._on_connect is not None:
                    await self._on_connect()
                self.ready.set()
                if await self._follow(stream):
                    logger.info("%s: nothing for %.0fs; opening the stream again", self.name, self._resync_seconds)
                    continue
                reason = "it ended"
            except (ModelgridError, LookupError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError for a call cancelled under it, e.g. when the channel pool closes
                # the channel of an instance that left Consul while its stream was open. Only a cancellation of
                # this task itself (stop()) ends the follower; the other is a broken stream like any other.
                if cancelling():
                    raise
                reason = "the call was cancelled under it (its channel closed)"
            except Exception as exc:  # noqa: BLE001 - a follower lives as long as its process: log, back off, go on
                logger.error("%s: unexpected error while following", self.name, exc_info=exc)
                reason = f"unexpected {type(exc).__name__}"
            finally:
                if stream is not None:
                    await _close(stream)
            delay = self._backoff.next()
            logger.warning("%s: the stream broke (%s); reconnecting in %.1fs", self.name, reason, delay)
            await asyncio.sleep(delay)

    async def _follow(self, stream: AsyncIterator[T]) -> bool:
        """Hands each item to `on_item` until the stream ends (False) or stays quiet `resync_seconds` (True)."""
        items = aiter(stream)
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancel (stop()) that arrives as an item
            # does, and the follower would then never stop.
            try:
                async with asyncio.timeout(self._resync_seconds) as quiet:
                    item = await anext(items)
            except StopAsyncIteration:
                return False
            except TimeoutError:
                if quiet.expired():
                    return True
                raise
            await self._on_item(item)
            self._backoff.reset()


async def _close(stream: object) -> None:
    """Ends a stream whatever its state: an async generator is closed (a client's generator cancels its call in
    its `finally`), a gRPC call is cancelled."""
    with contextlib.suppress(Exception):
        if hasattr(stream, "aclose"):
            await stream.aclose()
        elif hasattr(stream, "cancel"):
            stream.cancel()


def cancelling() -> bool:
    """Whether the running task itself is being cancelled, as opposed to a gRPC call it awaited (grpc.aio raises
    CancelledError in the awaiting task when a call is cancelled under it, e.g. by its channel's close())."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
