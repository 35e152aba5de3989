"""Following a server stream for a process's lifetime: reconnect when it breaks, with backoff and jitter, and a
resync on every (re)connection so that nothing that happened while it was down is missed."""

import asyncio
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
    """

    def __init__(
        self,
        name: str,
        open_stream: Callable[[], AsyncIterator[T]],
        on_item: Callable[[T], Awaitable[None]],
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self._open_stream = open_stream
        self._on_item = on_item
        self._on_connect = on_connect
        self._backoff = backoff or Backoff()
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
            try:
                stream = self._open_stream()
                if self._on_connect is not None:
                    await self._on_connect()
                self.ready.set()
                async for item in stream:
                    await self._on_item(item)
                    self._backoff.reset()
                reason = "it ended"
            except (ModelgridError, LookupError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - a follower lives as long as its process: log, back off, go on
                logger.error("%s: unexpected error while following", self.name, exc_info=exc)
                reason = f"unexpected {type(exc).__name__}"
            delay = self._backoff.next()
            logger.warning("%s: the stream broke (%s); reconnecting in %.1fs", self.name, reason, delay)
            await asyncio.sleep(delay)
