"""What every typed client shares: its stub, the deadline and headers of each call, and failed calls raised as the
errors of `modelgrid.client.errors`."""

from collections.abc import Callable, Sequence
from typing import Any

from modelgrid.client.rpc_errors import rpc_errors

Metadata = Sequence[tuple[str, str]]
"""Extra headers sent with every call (the API key goes in the channel: `connect(api_key=...)`)."""


class Calls:
    """Blocking calls of one service's stub."""

    service = ""

    def __init__(self, stub: Any, timeout: float | None, metadata: Metadata) -> None:
        self.stub = stub
        self.timeout = timeout
        self.headers = tuple(metadata)

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        with rpc_errors(self.service):
            return method(request, timeout=self.timeout, metadata=self.headers)


class AsyncCalls(Calls):
    """asyncio calls of one service's stub."""

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        with rpc_errors(self.service):
            return await method(request, timeout=self.timeout, metadata=self.headers)
