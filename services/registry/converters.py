"""Conversions between registry protobuf messages and domain types."""

from google.protobuf.timestamp_pb2 import Timestamp

from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb
from services.kit.modelref import ModelRef
from services.kit.tensors import BY_NAME
from services.registry import domain
from services.registry.core import NewVersion


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def status_from_pb(value: int) -> domain.VersionStatus | None:
    """None for UNSPECIFIED."""
    if value == pb.VERSION_STATUS_UNSPECIFIED:
        return None
    return domain.VersionStatus(pb.VersionStatus.Name(value).removeprefix("VERSION_STATUS_"))


def format_from_pb(value: int) -> domain.ArtifactFormat:
    """UNSPECIFIED means RAW."""
    if value == pb.ARTIFACT_FORMAT_UNSPECIFIED:
        return domain.ArtifactFormat.RAW
    return domain.ArtifactFormat(pb.ArtifactFormat.Name(value).removeprefix("ARTIFACT_FORMAT_"))


def ref_from_pb(ref: common_pb2.ModelRef) -> ModelRef:
    selector = ref.WhichOneof("selector")
    if selector == "version":
        return ModelRef(ref.name, version=ref.version)
    if selector == "alias":
        return ModelRef(ref.name, alias=ref.alias)
    return ModelRef(ref.name)


def ref_to_pb(ref: ModelRef) -> common_pb2.ModelRef:
    if ref.version:
        return common_pb2.ModelRef(name=ref.name, version=ref.version)
    if ref.alias:
        return common_pb2.ModelRef(name=ref.name, alias=ref.alias)
    return common_pb2.ModelRef(name=ref.name)


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
        lineage=domain.Lineage(
            training_job_id=meta.lineage.training_job_id,
            dataset_digest=meta.lineage.dataset_digest,
            parent_version=meta.lineage.parent_version,
            source=meta.lineage.source,
        ),
        request_id=meta.request_id,
    )


def model_to_pb(model: domain.RegisteredModel) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=model.name,
        description=model.description,
        tags=model.tags,
        aliases=model.aliases,
        latest_version=model.latest_version,
        created_at=timestamp(model.created_at),
        updated_at=timestamp(model.updated_at),
    )


def _spec_to_pb(spec: domain.TensorSpec) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(
        name=spec.name,
        dtype=BY_NAME[spec.dtype].proto if spec.dtype in BY_NAME else common_pb2.DATA_TYPE_UNSPECIFIED,
        shape=spec.shape,
        unknown_rank=spec.unknown_rank,
    )


def artifact_to_pb(artifact: domain.Artifact) -> pb.Artifact:
    return pb.Artifact(
        digest=artifact.digest,
        size_bytes=artifact.size_bytes,
        format=pb.ArtifactFormat.Value(f"ARTIFACT_FORMAT_{artifact.format.value}"),
    )


def version_to_pb(version: domain.ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        model_name=version.model_name,
        version=version.version,
        status=pb.VersionStatus.Value(f"VERSION_STATUS_{version.status.value}"),
        artifact=artifact_to_pb(version.artifact),
        metrics=version.metrics,
        params=version.params,
        tags=version.tags,
        description=version.description,
        lineage=pb.Lineage(
            training_job_id=version.lineage.training_job_id,
            dataset_digest=version.lineage.dataset_digest,
            parent_version=version.lineage.parent_version,
            source=version.lineage.source,
        ),
        signatures=[
            pb.Signature(
                name=s.name,
                method_name=s.method_name,
                inputs=[_spec_to_pb(t) for t in s.inputs],
                outputs=[_spec_to_pb(t) for t in s.outputs],
            )
            for s in version.signatures
        ],
        aliases=version.aliases,
        created_at=timestamp(version.created_at),
        updated_at=timestamp(version.updated_at),
        created_by=version.created_by,
    )


def alias_to_pb(alias: domain.Alias) -> pb.Alias:
    return pb.Alias(
        model_name=alias.model_name, alias=alias.alias, version=alias.version, previous_version=alias.previous_version
    )


def event_to_pb(event: domain.RegistryEvent) -> pb.RegistryEvent:
    return pb.RegistryEvent(
        cursor=event.cursor,
        type=pb.EventType.Value(f"EVENT_TYPE_{event.type.value}"),
        model_name=event.model_name,
        version=event.version,
        alias=event.alias,
        previous_version=event.previous_version,
        actor=event.actor,
        time=timestamp(event.time),
        details=event.details,
    )
