"""Tensors on the wire: one table of element types across numpy, modelgrid's DataType, the Open Inference
Protocol's datatype strings and TensorFlow's DataType numbers, and Tensor message <-> numpy conversions.

Strings (bytes) travel as a 4-byte little-endian length followed by the bytes, per element, in row-major order:
the same layout the Open Inference Protocol uses for BYTES in raw contents.
"""

import struct
from dataclasses import dataclass

import numpy as np

from modelgrid.common.v1 import common_pb2
from services.kit.errors import InvalidArgument


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


def decode_strings(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """An object array of bytes from length-prefixed elements; InvalidArgument when the bytes do not fit."""
    count = int(np.prod(shape)) if shape else 1
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


def array_from_raw(raw: bytes, element: ElementType, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A numpy array from raw little-endian bytes; InvalidArgument when the size does not match the shape."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {list(shape)}")
    if element.name == "string":
        return decode_strings(raw, shape)
    if element.numpy is None:
        raise InvalidArgument(f"{what}: element type {element.name} is not supported for computation")
    expected = int(np.prod(shape, dtype=np.int64)) * element.numpy.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{what}: {len(raw)} bytes do not match shape {list(shape)} of {element.name} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=element.numpy).reshape(shape)


def raw_of(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of an array (length-prefixed elements for strings)."""
    if element_type_of(array).name == "string":
        return encode_strings(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def tensor_to_array(tensor: common_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """numpy array of a modelgrid Tensor message."""
    element = BY_PROTO.get(tensor.dtype)
    if element is None:
        raise InvalidArgument(f"{what}: dtype is not set or unknown ({tensor.dtype})")
    return array_from_raw(tensor.raw_data, element, tuple(tensor.shape), what)


def array_to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """A modelgrid Tensor message of a numpy array."""
    return common_pb2.Tensor(dtype=element_type_of(array).proto, shape=array.shape, raw_data=raw_of(array))
