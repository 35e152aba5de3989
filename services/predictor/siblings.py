"""The other processes of a multi-process predictor replica (kit.replica), for calls every process must see."""

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from modelgrid.client.errors import Unavailable
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc

logger = logging.getLogger(__name__)

LOADED = {pb.VERSION_STATE_PREPARED, pb.VERSION_STATE_AVAILABLE, pb.VERSION_STATE_UNLOADING, pb.VERSION_STATE_FAILED}
"""A sibling's version in one of these states has finished loading (or will not): nothing to wait for."""
POLL_SECONDS = 0.02


class Siblings:
    """The other processes of a multi-process replica (kit.replica), reached on their control sockets: a call that
    changes what the replica serves (LoadModel, UnloadModel) is made on every process before it is answered, and a
    newly loaded version waits for every process to have it (`wait_loaded`), so the replica's processes serve the
    same models and versions whichever one a client's connection reaches."""

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

    async def wait_loaded(self, name: str, versions: list[int], timeout: float) -> None:
        """Returns once every sibling has finished loading `versions` of model `name` (a version PREPARED,
        AVAILABLE or FAILED there), doesn't serve the model, or cannot be reached; or after `timeout` seconds.
        Asked every POLL_SECONDS (20 ms), so the processes that wait switch within one poll of the last one."""
        waiting = set(self._sockets())
        deadline = time.monotonic() + timeout
        request = pb.GetModelMetadataRequest(name=name)
        while waiting:
            checks = {path: self._metadata(path, request) for path in waiting}
            for path, status in zip(checks, await asyncio.gather(*checks.values()), strict=True):
                if status is None or {v.version for v in status.versions if v.state in LOADED} >= set(versions):
                    waiting.discard(path)
            if not waiting:
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "%s versions %s: %d sibling processes had not loaded them after %.0fs; serving them anyway",
                    name,
                    versions,
                    len(waiting),
                    timeout,
                )
                return
            await asyncio.sleep(POLL_SECONDS)

    async def _metadata(self, path: str, request: pb.GetModelMetadataRequest) -> pb.ModelStatus | None:
        """A sibling's status of one model; None when it does not serve the model or cannot be reached."""
        stub = predictor_pb2_grpc.PredictorStub(self._channel(path))
        try:
            return await stub.GetModelMetadata(request, timeout=1.0)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # busy: ask again
                return pb.ModelStatus(name=request.name)
            return None  # NOT_FOUND (not served there) or UNAVAILABLE (the process is gone)

    def _channel(self, path: str) -> grpc.aio.Channel:
        channel = self._channels.get(path)
        if channel is None:
            channel = self._channels[path] = grpc.aio.insecure_channel(f"unix:{path}")
        return channel

    def _callable(self, path: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        channel = self._channel(path)
        # The answer is not needed (this process answers with its own): bytes, not parsed.
        return channel.unary_unary(method, request_serializer=lambda message: message.SerializeToString())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
