"""Tensors on the wire: one table of element types across numpy, modelgrid's DataType, the Open Inference
Protocol's datatype strings and TensorFlow's DataType numbers, and Tensor message <-> numpy conversions.

Strings (bytes) travel as a 4-byte little-endian length followed by the bytes, per element, in row-major order:
the same layout the Open Inference Protocol uses for BYTES in raw contents.

A request tensor is checked before anything is allocated for it, the same way in every protocol: `element_count`
refuses shapes no tensor can have (negative dimensions, too many dimensions, more elements than int64 holds; in
Python ints, so nothing overflows), the protocol compares the count with the values actually sent, and a
`SizeBudget` (one per request) refuses tensors whose decoded size would exceed the request's limit.
"""

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelgrid.client.errors import InvalidArgument, ResourceExhausted
from modelgrid.common.v1 import common_pb2

MAX_RANK = 32
"""Most dimensions a request tensor may have (numpy's own limit is 32 before numpy 2, 64 after)."""
MAX_ELEMENTS = (2**63 - 1) // 8
"""Elements no tensor can have (numpy and TensorFlow count bytes in int64; elements take up to 8 bytes)."""
STRING_ELEMENT_BYTES = 64
"""Memory a decoded string element takes besides its bytes: a Python bytes object and the pointer to it."""
MAX_NAME_CHARS = 64
"""How much of a client-chosen tensor name error messages repeat."""


@dataclass(frozen=True)
class ElementType:
    """One element type under its four names."""

    name: str  # numpy-style, also used in domain types and messages to users
    proto: int  # modelgrid.common.v1.DataType
    oip: str  # Open Inference Protocol datatype
    tf: int  # tensorflow DataType enum value (types.proto)
    numpy: np.dtype | None  # None for strings (object arrays of bytes)


ELEMENT_TYPES = [
    ElementType("bool", common_pb2.DATA_TYPE_BOOL, "BOOL", 10, np.dtype("bool")),
    ElementType("uint8", common_pb2.DATA_TYPE_UINT8, "UINT8", 4, np.dtype("<u1")),
    ElementType("uint16", common_pb2.DATA_TYPE_UINT16, "UINT16", 17, np.dtype("<u2")),
    ElementType("uint32", common_pb2.DATA_TYPE_UINT32, "UINT32", 22, np.dtype("<u4")),
    ElementType("uint64", common_pb2.DATA_TYPE_UINT64, "UINT64", 23, np.dtype("<u8")),
    ElementType("int8", common_pb2.DATA_TYPE_INT8, "INT8", 6, np.dtype("<i1")),
    ElementType("int16", common_pb2.DATA_TYPE_INT16, "INT16", 5, np.dtype("<i2")),
    ElementType("int32", common_pb2.DATA_TYPE_INT32, "INT32", 3, np.dtype("<i4")),
    ElementType("int64", common_pb2.DATA_TYPE_INT64, "INT64", 9, np.dtype("<i8")),
    ElementType("float16", common_pb2.DATA_TYPE_FLOAT16, "FP16", 19, np.dtype("<f2")),
    ElementType("float32", common_pb2.DATA_TYPE_FLOAT32, "FP32", 1, np.dtype("<f4")),
    ElementType("float64", common_pb2.DATA_TYPE_FLOAT64, "FP64", 2, np.dtype("<f8")),
    ElementType("bfloat16", common_pb2.DATA_TYPE_BFLOAT16, "BF16", 14, None),
    ElementType("string", common_pb2.DATA_TYPE_STRING, "BYTES", 7, None),
]
BY_NAME = {t.name: t for t in ELEMENT_TYPES}
BY_PROTO = {t.proto: t for t in ELEMENT_TYPES}
BY_OIP = {t.oip: t for t in ELEMENT_TYPES}
BY_TF = {t.tf: t for t in ELEMENT_TYPES}
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The Open Inference Protocol's InferTensorContents member that carries each datatype's elements (FP16 and BF16 have
none: raw contents only)."""


def element_bytes(element: ElementType) -> int:
    """Memory one decoded element of `element` takes (strings: STRING_ELEMENT_BYTES, besides their bytes)."""
    if element.numpy is not None:
        return element.numpy.itemsize
    return STRING_ELEMENT_BYTES if element.name == "string" else 2  # bfloat16


def input_label(name: str) -> str:
    """ "input 'x'" for error messages, with a long client-chosen name cut short."""
    if len(name) > MAX_NAME_CHARS:
        return f"input {name[:MAX_NAME_CHARS]!r}... ({len(name)} characters)"
    return f"input {name!r}"


def element_count(shape: Sequence[int], what: str) -> int:
    """The number of elements of a request tensor's shape, computed without allocating and without overflow.

    InvalidArgument when no tensor can have the shape: more than MAX_RANK dimensions, a negative one (-1, "unknown",
    has no place in a request), or more than MAX_ELEMENTS elements (zero dimensions aside: numpy refuses those
    shapes even when they hold nothing)."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{what}: shape has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    count = span = 1
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"{what}: negative dimension in shape {list(shape)}")
        count *= d
        span *= d or 1
    if span > MAX_ELEMENTS:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} has more elements than any tensor can hold (at most {MAX_ELEMENTS})"
        )
    return count


class SizeBudget:
    """The memory the tensors of one request may take once decoded, charged tensor by tensor before each is
    allocated. `limit` None: no limit; `setting` names the setting that raises it, for the error message."""

    __slots__ = ("limit", "setting", "used")

    def __init__(self, limit: int | None, setting: str = "") -> None:
        self.limit = limit
        self.setting = setting
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Adds `nbytes`; ResourceExhausted when the request's tensors would then take more than the limit."""
        self.used += nbytes
        if self.limit is not None and self.used > self.limit:
            setting = f" ({self.setting})" if self.setting else ""
            raise ResourceExhausted(
                f"{what}: the request's tensors would take {self.used} bytes once decoded, more than the limit of "
                f"{self.limit} bytes{setting}; send fewer or smaller tensors per request"
            )

    def charge_tensor(self, count: int, element: ElementType, what: str) -> None:
        """Charges `count` decoded elements of `element`."""
        self.charge(count * element_bytes(element), what)


def element_type_of(array: np.ndarray) -> ElementType:
    """The element type of a numpy array (object and bytes arrays are strings)."""
    if array.dtype.kind in ("O", "S"):
        return BY_NAME["string"]
    for element in ELEMENT_TYPES:
        if element.numpy is not None and element.numpy == array.dtype.newbyteorder("<"):
            return element
    raise InvalidArgument(f"unsupported element type {array.dtype}")


def encode_strings(array: np.ndarray) -> bytes:
    """Length-prefixed bytes of every element, row-major."""
    parts = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _check_string_bytes(raw: bytes, count: int, what: str) -> None:
    """Every string element starts with its 4-byte length: refuses, before anything is built, bytes too short for
    `count` elements."""
    if count * 4 > len(raw):
        raise InvalidArgument(
            f"{what}: string tensor bytes end before all elements were read: {len(raw)} bytes cannot hold {count} "
            "elements of at least 4 bytes each"
        )


def decode_strings(raw: bytes, shape: tuple[int, ...], count: int | None = None) -> np.ndarray:
    """An object array of bytes from length-prefixed elements; InvalidArgument when the bytes do not fit.
    `count`: the shape's element count when the caller has checked it already."""
    if count is None:
        count = element_count(shape, "string tensor")
        _check_string_bytes(raw, count, "string tensor")
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidArgument("string tensor bytes end before all elements were read")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument("string tensor element runs past the end of the bytes")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidArgument(f"string tensor has {len(raw) - offset} bytes after its {count} elements")
    return np.array(items, dtype=object).reshape(shape)


def array_from_raw(
    raw: bytes, element: ElementType, shape: tuple[int, ...], what: str, budget: SizeBudget | None = None
) -> np.ndarray:
    """A numpy array from raw little-endian bytes; InvalidArgument when the size does not match the shape,
    ResourceExhausted when `budget` cannot pay for the decoded tensor. Checks everything before allocating."""
    count = element_count(shape, what)
    if element.name == "string":
        _check_string_bytes(raw, count, what)
        if budget is not None:  # the elements' Python objects, and their bytes copied out of the message
            budget.charge(count * STRING_ELEMENT_BYTES + len(raw), what)
        return decode_strings(raw, shape, count)
    if element.numpy is None:
        raise InvalidArgument(f"{what}: element type {element.name} is not supported for computation")
    expected = count * element.numpy.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{what}: {len(raw)} bytes do not match shape {list(shape)} of {element.name} ({expected} bytes)"
        )
    if budget is not None:
        budget.charge(expected, what)
    return np.frombuffer(raw, dtype=element.numpy).reshape(shape)


def raw_of(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of an array (length-prefixed elements for strings)."""
    if element_type_of(array).name == "string":
        return encode_strings(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def tensor_to_array(tensor: common_pb2.Tensor, what: str = "tensor", budget: SizeBudget | None = None) -> np.ndarray:
    """numpy array of a modelgrid Tensor message (request tensors: with the request's `budget`)."""
    element = BY_PROTO.get(tensor.dtype)
    if element is None:
        raise InvalidArgument(f"{what}: dtype is not set or unknown ({tensor.dtype})")
    return array_from_raw(tensor.raw_data, element, tuple(tensor.shape), what, budget)


def array_to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """A modelgrid Tensor message of a numpy array."""
    return common_pb2.Tensor(dtype=element_type_of(array).proto, shape=array.shape, raw_data=raw_of(array))
