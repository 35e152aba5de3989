"""The registry's clients: `AsyncRegistryClient` for services, blocking `RegistryClient` for programs and the CLI,
and the dataclasses both return."""

from services.clients.registry.aio import AsyncRegistryClient
from services.clients.registry.sync import Progress, RegistryClient
from services.clients.registry.types import (
    Alias,
    Artifact,
    ArtifactFormat,
    Blob,
    Download,
    EventType,
    Lineage,
    ModelVersion,
    RegisteredModel,
    RegistryEvent,
    Signature,
    TensorSpec,
    VersionStatus,
)

__all__ = [
    "Alias",
    "Artifact",
    "ArtifactFormat",
    "AsyncRegistryClient",
    "Blob",
    "Download",
    "EventType",
    "Lineage",
    "ModelVersion",
    "Progress",
    "RegisteredModel",
    "RegistryClient",
    "RegistryEvent",
    "Signature",
    "TensorSpec",
    "VersionStatus",
]
