"""The registry's protobuf messages <-> its API dataclasses, in both directions: the registry's servicer sends what
its clients read back, through the same functions."""

from modelgrid.client.convert import enum_member, seconds_of, timestamp
from modelgrid.client.registry import types
from modelgrid.client.tensors import BY_NAME, BY_PROTO
from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb


def status_to_pb(status: types.VersionStatus) -> int:
    return pb.VersionStatus.Value(f"VERSION_STATUS_{status.value}")


def status_from_pb(value: int) -> types.VersionStatus | None:
    """None for UNSPECIFIED."""
    if value == pb.VERSION_STATUS_UNSPECIFIED:
        return None
    return types.VersionStatus(enum_member(pb.VersionStatus, value, "version status").removeprefix("VERSION_STATUS_"))


def format_to_pb(value: types.ArtifactFormat) -> int:
    return pb.ArtifactFormat.Value(f"ARTIFACT_FORMAT_{value.value}")


def format_from_pb(value: int) -> types.ArtifactFormat:
    """UNSPECIFIED means RAW."""
    if value == pb.ARTIFACT_FORMAT_UNSPECIFIED:
        return types.ArtifactFormat.RAW
    name = enum_member(pb.ArtifactFormat, value, "artifact format")
    return types.ArtifactFormat(name.removeprefix("ARTIFACT_FORMAT_"))


def model_to_pb(model: types.RegisteredModel) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=model.name,
        description=model.description,
        tags=model.tags,
        aliases=model.aliases,
        latest_version=model.latest_version,
        created_at=timestamp(model.created_at),
        updated_at=timestamp(model.updated_at),
    )


def model_from_pb(message: pb.RegisteredModel) -> types.RegisteredModel:
    return types.RegisteredModel(
        name=message.name,
        description=message.description,
        tags=dict(message.tags),
        created_at=seconds_of(message.created_at),
        updated_at=seconds_of(message.updated_at),
        aliases=dict(message.aliases),
        latest_version=message.latest_version,
    )


def _spec_to_pb(spec: types.TensorSpec) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(
        name=spec.name,
        dtype=BY_NAME[spec.dtype].proto if spec.dtype in BY_NAME else common_pb2.DATA_TYPE_UNSPECIFIED,
        shape=spec.shape,
        unknown_rank=spec.unknown_rank,
    )


def _spec_from_pb(message: common_pb2.TensorSpec) -> types.TensorSpec:
    element = BY_PROTO.get(message.dtype)
    return types.TensorSpec(
        name=message.name,
        dtype=element.name if element else "",
        shape=list(message.shape),
        unknown_rank=message.unknown_rank,
    )


def artifact_to_pb(artifact: types.Artifact) -> pb.Artifact:
    return pb.Artifact(digest=artifact.digest, size_bytes=artifact.size_bytes, format=format_to_pb(artifact.format))


def artifact_from_pb(message: pb.Artifact) -> types.Artifact:
    return types.Artifact(digest=message.digest, size_bytes=message.size_bytes, format=format_from_pb(message.format))


def lineage_to_pb(lineage: types.Lineage) -> pb.Lineage:
    return pb.Lineage(
        training_job_id=lineage.training_job_id,
        dataset_digest=lineage.dataset_digest,
        parent_version=lineage.parent_version,
        source=lineage.source,
    )


def lineage_from_pb(message: pb.Lineage) -> types.Lineage:
    return types.Lineage(
        training_job_id=message.training_job_id,
        dataset_digest=message.dataset_digest,
        parent_version=message.parent_version,
        source=message.source,
    )


def signature_to_pb(signature: types.Signature) -> pb.Signature:
    return pb.Signature(
        name=signature.name,
        method_name=signature.method_name,
        inputs=[_spec_to_pb(t) for t in signature.inputs],
        outputs=[_spec_to_pb(t) for t in signature.outputs],
    )


def signature_from_pb(message: pb.Signature) -> types.Signature:
    return types.Signature(
        name=message.name,
        method_name=message.method_name,
        inputs=[_spec_from_pb(t) for t in message.inputs],
        outputs=[_spec_from_pb(t) for t in message.outputs],
    )


def version_to_pb(version: types.ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        model_name=version.model_name,
        version=version.version,
        status=status_to_pb(version.status),
        artifact=artifact_to_pb(version.artifact),
        metrics=version.metrics,
        params=version.params,
        tags=version.tags,
        description=version.description,
        lineage=lineage_to_pb(version.lineage),
        signatures=[signature_to_pb(s) for s in version.signatures],
        aliases=version.aliases,
        created_at=timestamp(version.created_at),
        updated_at=timestamp(version.updated_at),
        created_by=version.created_by,
    )


def version_from_pb(message: pb.ModelVersion) -> types.ModelVersion:
    return types.ModelVersion(
        model_name=message.model_name,
        version=message.version,
        artifact=artifact_from_pb(message.artifact),
        status=status_from_pb(message.status) or types.VersionStatus.READY,
        metrics=dict(message.metrics),
        params=dict(message.params),
        tags=dict(message.tags),
        description=message.description,
        lineage=lineage_from_pb(message.lineage),
        signatures=[signature_from_pb(s) for s in message.signatures],
        created_at=seconds_of(message.created_at),
        updated_at=seconds_of(message.updated_at),
        created_by=message.created_by,
        aliases=list(message.aliases),
    )


def alias_to_pb(alias: types.Alias) -> pb.Alias:
    return pb.Alias(
        model_name=alias.model_name, alias=alias.alias, version=alias.version, previous_version=alias.previous_version
    )


def alias_from_pb(message: pb.Alias) -> types.Alias:
    return types.Alias(
        model_name=message.model_name,
        alias=message.alias,
        version=message.version,
        previous_version=message.previous_version,
    )


def event_to_pb(event: types.RegistryEvent) -> pb.RegistryEvent:
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


def event_from_pb(message: pb.RegistryEvent) -> types.RegistryEvent:
    return types.RegistryEvent(
        type=types.EventType(pb.EventType.Name(message.type).removeprefix("EVENT_TYPE_")),
        model_name=message.model_name,
        actor=message.actor,
        time=seconds_of(message.time),
        version=message.version,
        alias=message.alias,
        previous_version=message.previous_version,
        details=dict(message.details),
        cursor=message.cursor,
    )


def blob_from_pb(message: pb.BlobInfo) -> types.Blob:
    return types.Blob(digest=message.digest, size_bytes=message.size_bytes)


def download_to_pb(download: types.Download) -> pb.ArtifactHeader:
    return pb.ArtifactHeader(
        model_name=download.model_name, version=download.version, artifact=artifact_to_pb(download.artifact)
    )
