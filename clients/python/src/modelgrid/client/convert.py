"""Protobuf conversions every service shares: timestamps and model references (modelgrid.common.v1)."""

from google.protobuf.timestamp_pb2 import Timestamp

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import ModelRef
from modelgrid.common.v1 import common_pb2


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


MAX_NUMBER_DIGITS = 18
"""Longest decimal number a page token or a version string may be (below 2^63)."""


def parse_number(text: str, what: str) -> int:
    """A non-negative decimal number sent as text (a page token, an OIP version), or InvalidArgument: never a
    ValueError (Python refuses to convert more than 4300 digits) and never a number larger than an int64."""
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_NUMBER_DIGITS:
        raise InvalidArgument(f"invalid {what}: pass back the value a previous answer gave (at most 18 digits)")
    return int(text)


def enum_member(enum_type, value: int, what: str) -> str:
    """The name of a protobuf enum value, or InvalidArgument for a number the enum does not define."""
    try:
        return enum_type.Name(value)
    except ValueError:
        raise InvalidArgument(f"unknown {what} {value}") from None
