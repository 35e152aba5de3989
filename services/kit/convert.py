"""Protobuf conversions every service shares: timestamps and model references (modelgrid.common.v1)."""

from google.protobuf.timestamp_pb2 import Timestamp

from modelgrid.common.v1 import common_pb2
from services.kit.modelref import ModelRef


def timestamp(seconds: float) -> Timestamp:
    """A Timestamp message of seconds since the epoch."""
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def seconds_of(ts: Timestamp) -> float:
    """Seconds since the epoch of a Timestamp message (0.0 when unset)."""
    return ts.ToNanoseconds() / 1e9


def ref_to_pb(ref: ModelRef | str) -> common_pb2.ModelRef:
    """A ModelRef message of a reference or of its text ("name", "name:3", "name@alias")."""
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    if ref.version:
        return common_pb2.ModelRef(name=ref.name, version=ref.version)
    if ref.alias:
        return common_pb2.ModelRef(name=ref.name, alias=ref.alias)
    return common_pb2.ModelRef(name=ref.name)


def ref_from_pb(message: common_pb2.ModelRef) -> ModelRef:
    """The reference a ModelRef message names (no selector: the latest READY version)."""
    selector = message.WhichOneof("selector")
    if selector == "version":
        return ModelRef(message.name, version=message.version)
    if selector == "alias":
        return ModelRef(message.name, alias=message.alias)
    return ModelRef(message.name)
