"""A service's stub next to the registry session, for the predictor and trainer commands."""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf.message import Message

from services.cli.output import Output
from services.cli.registry_commands import RegistrySession
from services.clients.registry import RegistryClient

logger = logging.getLogger(__name__)


@dataclass
class StubSession:
    """A stub of `stub_class` beside the registry session (its client, metadata, deadline and output)."""

    stub_class: ClassVar[type]
    registry: RegistrySession
    stub: Any

    @classmethod
    def over(cls, registry: RegistrySession, channel: grpc.Channel) -> "StubSession":
        return cls(registry, cls.stub_class(channel))

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
