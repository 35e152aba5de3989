"""Tables and detail views of registry objects for people; `--json` prints the protobuf messages instead."""

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC

from google.protobuf.timestamp_pb2 import Timestamp
from rich.filesize import decimal
from rich.table import Table

from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb

logger = logging.getLogger(__name__)

SHORT_DIGEST = 12


def status_name(status: int) -> str:
    """READY, ARCHIVED... for a VersionStatus value."""
    return pb.VersionStatus.Name(status).removeprefix("VERSION_STATUS_")


def format_name(artifact_format: int) -> str:
    """RAW or SAVEDMODEL_TAR for an ArtifactFormat value."""
    return pb.ArtifactFormat.Name(artifact_format).removeprefix("ARTIFACT_FORMAT_")


def event_name(event_type: int) -> str:
    """VERSION_CREATED, ALIAS_SET... for an EventType value."""
    return pb.EventType.Name(event_type).removeprefix("EVENT_TYPE_")


def dtype_name(dtype: int) -> str:
    """float32, int64... for a DataType value."""
    return common_pb2.DataType.Name(dtype).removeprefix("DATA_TYPE_").lower()


def timestamp_text(ts: Timestamp) -> str:
    """ISO 8601 UTC time to the second, empty when unset."""
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def pairs_text(pairs: Mapping[str, object]) -> str:
    """ "k=v, k=v" sorted by key."""
    return ", ".join(f"{key}={pairs[key]}" for key in sorted(pairs))


def tensor_text(spec: common_pb2.TensorSpec) -> str:
    """ "x: float32 [?, 4]": name, dtype and shape, "?" for a dimension of any size."""
    if spec.unknown_rank:
        shape = "<unknown rank>"
    else:
        shape = "[" + ", ".join("?" if dim < 0 else str(dim) for dim in spec.shape) + "]"
    return f"{spec.name}: {dtype_name(spec.dtype)} {shape}"


def signature_text(signature: pb.Signature) -> str:
    """One signature over several lines: its key and method, then each input and output."""
    lines = [f"{signature.name} ({signature.method_name})"]
    lines += [f"  in   {tensor_text(spec)}" for spec in signature.inputs]
    lines += [f"  out  {tensor_text(spec)}" for spec in signature.outputs]
    return "\n".join(lines)


def _table(*headers: str) -> Table:
    """A borderless table whose cells fold rather than lose characters when the terminal is narrow."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def _details(rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column key/value grid, skipping empty values."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        if value:
            grid.add_row(key, value)
    return grid


def model_detail(model: pb.RegisteredModel) -> Table:
    """Everything about one registered model."""
    aliases = ", ".join(f"{alias}={model.aliases[alias]}" for alias in sorted(model.aliases))
    return _details(
        [
            ("name", model.name),
            ("description", model.description),
            ("latest version", str(model.latest_version)),
            ("aliases", aliases or "-"),
            ("tags", pairs_text(model.tags) or "-"),
            ("created", timestamp_text(model.created_at)),
            ("updated", timestamp_text(model.updated_at)),
        ]
    )


def models_table(models: Iterable[pb.RegisteredModel]) -> Table:
    """One row per model."""
    table = _table("NAME", "LATEST", "ALIASES", "TAGS", "DESCRIPTION", "UPDATED")
    for model in models:
        aliases = ", ".join(f"{alias}={model.aliases[alias]}" for alias in sorted(model.aliases))
        table.add_row(
            model.name,
            str(model.latest_version),
            aliases,
            pairs_text(model.tags),
            model.description,
            timestamp_text(model.updated_at),
        )
    return table


def _lineage_text(lineage: pb.Lineage) -> str:
    parts = {
        "job": lineage.training_job_id,
        "dataset": lineage.dataset_digest,
        "parent": str(lineage.parent_version) if lineage.parent_version else "",
        "source": lineage.source,
    }
    return ", ".join(f"{key}={value}" for key, value in parts.items() if value)


def version_detail(version: pb.ModelVersion) -> Table:
    """Everything about one version, signatures included."""
    artifact = version.artifact
    return _details(
        [
            ("model", version.model_name),
            ("version", str(version.version)),
            ("status", status_name(version.status)),
            ("description", version.description),
            ("format", format_name(artifact.format)),
            ("size", f"{decimal(artifact.size_bytes)} ({artifact.size_bytes} bytes)"),
            ("digest", artifact.digest),
            ("aliases", ", ".join(sorted(version.aliases))),
            ("metrics", pairs_text(version.metrics)),
            ("params", pairs_text(version.params)),
            ("tags", pairs_text(version.tags)),
            ("lineage", _lineage_text(version.lineage)),
            ("created", timestamp_text(version.created_at)),
            ("created by", version.created_by),
            ("updated", timestamp_text(version.updated_at)),
            ("signatures", "\n".join(signature_text(sig) for sig in version.signatures)),
        ]
    )


def versions_table(versions: Iterable[pb.ModelVersion]) -> Table:
    """One row per version, newest first as the registry lists them."""
    table = _table("VERSION", "STATUS", "FORMAT", "SIZE", "DIGEST", "ALIASES", "METRICS", "CREATED")
    for version in versions:
        table.add_row(
            str(version.version),
            status_name(version.status),
            format_name(version.artifact.format),
            decimal(version.artifact.size_bytes),
            version.artifact.digest[:SHORT_DIGEST],
            ", ".join(sorted(version.aliases)),
            pairs_text(version.metrics),
            timestamp_text(version.created_at),
        )
    return table


def events_table(events: Iterable[pb.RegistryEvent]) -> Table:
    """One row per audit-trail event, oldest first."""
    table = _table("TIME", "EVENT", "VERSION", "ALIAS", "PREVIOUS", "ACTOR", "DETAILS")
    for event in events:
        table.add_row(
            timestamp_text(event.time),
            event_name(event.type),
            str(event.version or ""),
            event.alias,
            str(event.previous_version or ""),
            event.actor,
            pairs_text(event.details),
        )
    return table
