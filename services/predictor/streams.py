"""Streaming prediction calls: every request of a stream runs concurrently (so they batch with each other) and
its answer goes back as soon as it is ready, with a bound on how many run at once."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

STREAM_CONCURRENCY = 64
"""Requests of one stream in flight at once; reading the stream pauses beyond it."""


class _Failed:
    """The request stream failed: the consumer raises this error."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def answer_concurrently(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Answer]],
    limit: int = STREAM_CONCURRENCY,
) -> AsyncIterator[Answer]:
    """Yields answer(request) for every request, in the order they finish. `answer` must turn its own failures
    into an answer (a stream goes on after one failed request); a failure to read the requests (a malformed
    message) is raised to the consumer at once. Cancelling the consumer cancels the rest."""
    answers: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    running: set[asyncio.Task] = set()
    done = object()

    async def run(request: Request) -> None:
        try:
            await answers.put(await answer(request))
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(run(request))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed message: raised to the consumer, ending the stream
            await answers.put(_Failed(exc))
            return
        await answers.put(done)

    reader = asyncio.create_task(read())
    try:
        while (item := await answers.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
        await reader
    finally:
        reader.cancel()
        for task in running:
            task.cancel()
