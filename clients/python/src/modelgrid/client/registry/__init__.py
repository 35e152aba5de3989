"""The registry's clients: `AsyncRegistryClient` for services, blocking `RegistryClient` for programs and the CLI,
and the dataclasses both return."""

from modelgrid.client.registry.aio import AsyncRegistryClient
from modelgrid.client.registry.sync import Progress, RegistryClient
from modelgrid.client.registry.types import (
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
