"""The registry's API as plain dataclasses: what its clients receive and what the registry itself stores.

Free of protobuf (modelgrid.client.registry.convert maps them to and from the wire)."""

import enum
from dataclasses import dataclass, field


class _StrEnum(str, enum.Enum):
    """enum.StrEnum of Python 3.11, for 3.10 too: a member is equal to, prints as and formats as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


KIND_TAG = "modelgrid.kind"
"""The tag that says what a registered model holds, set when it is created and never changed: absent for models
(SavedModels and files), RECIPE_KIND for training recipes (one Python module's source per version)."""
RECIPE_KIND = "recipe"


def is_recipe(tags: dict[str, str]) -> bool:
    """Whether a registered model with these tags holds training recipes (not something to serve)."""
    return tags.get(KIND_TAG) == RECIPE_KIND


class VersionStatus(_StrEnum):
    """Lifecycle of a model version."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    ARCHIVED = "ARCHIVED"


class ArtifactFormat(_StrEnum):
    """Layout of an artifact's bytes."""

    RAW = "RAW"
    SAVEDMODEL_TAR = "SAVEDMODEL_TAR"


class EventType(_StrEnum):
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
    offset: int = 0  # where this download started (resumed from what the destination already held)
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


@dataclass(frozen=True)
class Blob:
    """A stored blob that is not a model version (a data set, batch results): its sha256 and size."""

    digest: str
    size_bytes: int


@dataclass(frozen=True)
class Download:
    """What a verified download received: the version it resolved to (none for a blob) and its artifact."""

    model_name: str
    version: int
    artifact: Artifact
    offset: int = 0  # where this download started (resumed from what the destination already held)
