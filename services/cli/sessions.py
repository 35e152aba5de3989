"""A service's typed client (from the client library, modelgrid.client) and its stub next to the registry session,
for the predictor, trainer and gateway commands."""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf.message import Message

from modelgrid.client.registry import RegistryClient
from services.cli.output import Output
from services.cli.registry_commands import RegistrySession

logger = logging.getLogger(__name__)


@dataclass
class StubSession:
    """A stub of `stub_class` beside the registry session (its client, metadata, deadline and output), and the
    client library's typed client of the service (`api_class`) when it has one, with the same deadline and
    metadata: commands call `api` where it has the call, the stub for the rest (operators' calls)."""

    stub_class: ClassVar[type]
    api_class: ClassVar[type | None] = None
    registry: RegistrySession
    stub: Any
    api: Any = None

    @classmethod
    def over(cls, registry: RegistrySession, channel: grpc.Channel) -> "StubSession":
        if cls.api_class is None:
            return cls(registry, cls.stub_class(channel))
        api = cls.api_class(channel, timeout=registry.timeout, metadata=registry.metadata)
        return cls(registry, api.stub, api)

    @property
    def out(self) -> Output:
        return self.registry.out

    @property
    def client(self) -> RegistryClient:
        return self.registry.client

    def call(self, method: Callable[..., Message], request: Message | Iterator[Message]) -> Message:
        """One call (unary or client-streaming) with the client identity and the deadline."""
        logger.debug("%s %s", type(request).__name__, request)
        return method(request, metadata=self.registry.metadata, timeout=self.registry.timeout)
