"""Request messages of the registry's API -> the core's inputs. Replies go out through the converters the registry
shares with its clients (modelgrid.client.registry.convert)."""

from modelgrid.client.registry.convert import format_from_pb, lineage_from_pb
from modelgrid.registry.v1 import registry_pb2 as pb
from services.registry.core import NewVersion


def new_version_from_pb(meta: pb.VersionMetadata) -> NewVersion:
    return NewVersion(
        model_name=meta.model_name,
        artifact_digest=meta.artifact_digest,
        artifact_size=meta.artifact_size,
        artifact_format=format_from_pb(meta.artifact_format),
        description=meta.description,
        metrics=dict(meta.metrics),
        params=dict(meta.params),
        tags=dict(meta.tags),
        lineage=lineage_from_pb(meta.lineage),
        request_id=meta.request_id,
        from_blob=meta.from_blob,
    )
