"""Registry domain types: plain dataclasses, free of protobuf, stored in Redis as JSON."""

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any


class VersionStatus(enum.StrEnum):
    """Lifecycle of a model version."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    ARCHIVED = "ARCHIVED"


class ArtifactFormat(enum.StrEnum):
    """Layout of an artifact's bytes."""

    RAW = "RAW"
    SAVEDMODEL_TAR = "SAVEDMODEL_TAR"


class EventType(enum.StrEnum):
    """Kinds of recorded change."""

    MODEL_CREATED = "MODEL_CREATED"
    MODEL_UPDATED = "MODEL_UPDATED"
    MODEL_DELETED = "MODEL_DELETED"
    VERSION_CREATED = "VERSION_CREATED"
    VERSION_UPDATED = "VERSION_UPDATED"
    ALIAS_SET = "ALIAS_SET"
    ALIAS_DELETED = "ALIAS_DELETED"


@dataclass
class TensorSpec:
    """Declared name, dtype (numpy-style name such as "float32") and shape (-1: any) of a tensor."""

    name: str
    dtype: str
    shape: list[int] = field(default_factory=list)
    unknown_rank: bool = False


@dataclass
class Signature:
    """A serving signature of a SavedModel."""

    name: str
    method_name: str = ""
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


@dataclass
class Artifact:
    """A blob: its sha256, size and layout."""

    digest: str
    size_bytes: int
    format: ArtifactFormat = ArtifactFormat.RAW


@dataclass
class Lineage:
    """Where a version came from."""

    training_job_id: str = ""
    dataset_digest: str = ""
    parent_version: int = 0
    source: str = ""


@dataclass
class RegisteredModel:
    """A named model."""

    name: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    # Derived at read time, never stored in the model's JSON:
    aliases: dict[str, int] = field(default_factory=dict)
    latest_version: int = 0


@dataclass
class ModelVersion:
    """One version of a model."""

    model_name: str
    version: int
    artifact: Artifact
    status: VersionStatus = VersionStatus.READY
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    lineage: Lineage = field(default_factory=Lineage)
    signatures: list[Signature] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    created_by: str = ""
    # Derived at read time from the alias table:
    aliases: list[str] = field(default_factory=list)


@dataclass
class Alias:
    """An alias and the version it points at (and pointed at before the change)."""

    model_name: str
    alias: str
    version: int
    previous_version: int = 0


@dataclass
class RegistryEvent:
    """One recorded change."""

    type: EventType
    model_name: str
    actor: str
    time: float
    version: int = 0
    alias: str = ""
    previous_version: int = 0
    details: dict[str, str] = field(default_factory=dict)
    cursor: str = ""


_DERIVED = {"aliases", "latest_version", "cursor"}


def to_json(obj: Any) -> str:
    """Serialises a domain dataclass, leaving out fields derived at read time."""
    data = {k: v for k, v in dataclasses.asdict(obj).items() if k not in _DERIVED}
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def model_from_json(text: str) -> RegisteredModel:
    """Reads a RegisteredModel stored by to_json."""
    return RegisteredModel(**json.loads(text))


def version_from_json(text: str) -> ModelVersion:
    """Reads a ModelVersion stored by to_json."""
    data = json.loads(text)
    data["artifact"] = Artifact(
        digest=data["artifact"]["digest"],
        size_bytes=data["artifact"]["size_bytes"],
        format=ArtifactFormat(data["artifact"]["format"]),
    )
    data["status"] = VersionStatus(data["status"])
    data["lineage"] = Lineage(**data["lineage"])
    data["signatures"] = [
        Signature(
            name=s["name"],
            method_name=s["method_name"],
            inputs=[TensorSpec(**t) for t in s["inputs"]],
            outputs=[TensorSpec(**t) for t in s["outputs"]],
        )
        for s in data["signatures"]
    ]
    return ModelVersion(**data)
