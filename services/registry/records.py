"""Registry records in Redis: the API's dataclasses (modelgrid.client.registry.types) as JSON."""

import dataclasses
import json
from typing import Any

from modelgrid.client.registry.types import (
    Artifact,
    ArtifactFormat,
    Lineage,
    ModelVersion,
    RegisteredModel,
    Signature,
    TensorSpec,
    VersionStatus,
)

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
