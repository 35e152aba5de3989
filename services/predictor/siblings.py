"""The other processes of a multi-process predictor replica (kit.replica), for calls every process must see."""

import asyncio
from collections.abc import Callable

import grpc

from services.kit.errors import Unavailable


class Siblings:
    """The other processes of a multi-process replica (kit.replica), reached on their control sockets: a call that
    changes what the replica serves (LoadModel, UnloadModel) is made on every process before it is answered, so
    the replica's processes serve the same models whichever one a client's connection reaches."""

    def __init__(self, sockets: Callable[[], list[str]] = list) -> None:
        self._sockets = sockets
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def call(self, method: str, request, context) -> None:
        """Makes the same call (`method`: its full path) on every sibling, unless it came from one (over a Unix
        socket). Raises the first failure as Unavailable, naming the method: the caller may retry, since loading and
        unloading are idempotent."""
        if (context.peer() or "").startswith("unix:"):
            return
        sockets = self._sockets()
        if not sockets:
            return
        remaining = context.time_remaining()
        calls = [self._callable(path, method)(request, timeout=remaining) for path in sockets]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            first = failed[0]
            code = first.code().name if isinstance(first, grpc.aio.AioRpcError) else type(first).__name__
            detail = first.details() if isinstance(first, grpc.aio.AioRpcError) else ""
            raise Unavailable(
                f"{method} succeeded on this process but failed on {len(failed)} of its {len(sockets)} sibling "
                f"processes ({code}: {detail}); retry the call"
            )

    def _callable(self, path: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        channel = self._channels.get(path)
        if channel is None:
            channel = self._channels[path] = grpc.aio.insecure_channel(f"unix:{path}")
        # The answer is not needed (this process answers with its own): bytes, not parsed.
        return channel.unary_unary(method, request_serializer=lambda message: message.SerializeToString())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
