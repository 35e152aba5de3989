"""TensorFlow TensorProto <-> numpy, with TensorFlow's own decoding rules (as in `tf.make_ndarray` and TF Serving).

A TensorProto carries its elements either as raw little-endian bytes in `tensor_content` or in the typed
`*_val` field of its dtype. With fewer typed values than the shape holds, TensorFlow repeats the last value
(so one value broadcasts to the whole shape) and no values at all mean zeros; more values than the shape holds
is an error. Since a few bytes can thus declare any size, the decoded size is charged to the request's
`SizeBudget` from the shape alone, before anything is allocated. Strings always use `string_val`. Pure functions:
no gRPC, no event loop.
"""

from collections.abc import Sequence

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.tensors import (
    BY_TF,
    MAX_RANK,
    STRING_ELEMENT_BYTES,
    SizeBudget,
    array_from_raw,
    element_bytes,
    element_count,
    element_type_of,
    raw_of,
)

# The typed field that carries each supported dtype's elements (half_val holds float16 bit patterns).
VALUE_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_BFLOAT16: "half_val",
}
VALUE_FIELDS = (
    "float_val",
    "double_val",
    "int_val",
    "int64_val",
    "uint32_val",
    "uint64_val",
    "bool_val",
    "string_val",
    "half_val",
    "scomplex_val",
    "dcomplex_val",
    "resource_handle_val",
    "variant_val",
    "float8_val",
)


def dtype_name(dtype: int) -> str:
    """ "DT_FLOAT" for 1; the number itself when TensorFlow does not know it."""
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return str(dtype)


def _supported() -> list[str]:
    return sorted(dtype_name(d) for d in BY_TF)


def shape_of(proto: tensor_shape_pb2.TensorShapeProto, what: str) -> tuple[int, ...]:
    """The dimensions of a fully defined TensorShapeProto."""
    if proto.unknown_rank:
        raise InvalidArgument(f"{what}: tensor_shape has unknown rank; a request tensor needs a full shape")
    if len(proto.dim) > MAX_RANK:
        raise InvalidArgument(f"{what}: tensor_shape has {len(proto.dim)} dimensions; at most {MAX_RANK} are supported")
    shape = tuple(int(d.size) for d in proto.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{what}: tensor_shape {list(shape)} has an unknown (-1) or negative dimension; a request tensor needs "
            "every size"
        )
    return shape


def shape_proto(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    """A TensorShapeProto; -1 marks an unknown dimension (as in signatures)."""
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])


def array_from_tensor_proto(
    proto: tensor_pb2.TensorProto, what: str = "tensor", budget: SizeBudget | None = None
) -> np.ndarray:
    """A numpy array of a TensorProto (strings: an object array of bytes); InvalidArgument says what is wrong,
    ResourceExhausted when `budget` (the request's) cannot pay for the decoded tensor. Every check comes before
    any allocation."""
    element = BY_TF.get(proto.dtype)
    if element is None:
        raise InvalidArgument(f"{what}: dtype {dtype_name(proto.dtype)} is not supported; use one of {_supported()}")
    shape = shape_of(proto.tensor_shape, what)
    count = element_count(shape, what)
    field = VALUE_FIELD[proto.dtype]
    filled = [name for name in VALUE_FIELDS if len(getattr(proto, name))]
    if proto.tensor_content:
        if element.name == "string":
            raise InvalidArgument(f"{what}: DT_STRING tensors carry their elements in string_val, not tensor_content")
        if filled:
            raise InvalidArgument(f"{what}: tensor_content and {filled} are both set; use one of them")
        return array_from_raw(proto.tensor_content, element, shape, what, budget)
    wrong = [name for name in filled if name != field]
    if wrong:
        raise InvalidArgument(
            f"{what}: a {dtype_name(proto.dtype)} tensor carries its elements in {field} (or tensor_content), but "
            f"{wrong} hold values"
        )
    values = getattr(proto, field)
    if len(values) > count:
        raise InvalidArgument(f"{what}: {len(values)} values in {field} exceed shape {list(shape)} ({count} elements)")
    if element.name != "string" and element.numpy is None:
        raise InvalidArgument(f"{what}: element type {element.name} is not supported for computation")
    if budget is not None:  # the whole shape: fewer values are repeated (or zeros) to fill it
        budget.charge_tensor(count, element, what)
    if element.name == "string":
        flat = np.empty(count, dtype=object)
        if values:
            flat[: len(values)] = list(values)
            flat[len(values) :] = values[-1]
        else:
            flat[:] = b""
        return flat.reshape(shape)
    typed = _typed_values(values, element.numpy, proto.dtype, what)
    if typed.size == count:
        return typed.reshape(shape)
    if typed.size == 0:
        return np.zeros(shape, dtype=element.numpy)
    flat = np.empty(count, dtype=element.numpy)  # one allocation: the values, then the last one repeated
    flat[: typed.size] = typed
    flat[typed.size :] = typed[-1]
    return flat.reshape(shape)


def decode_work(proto: tensor_pb2.TensorProto) -> int:
    """About how many bytes decoding `proto` builds element by element (tensor_content of numbers is a view:
    none). Cheap and never raises, so a request can be sent to a thread before it is checked."""
    element = BY_TF.get(proto.dtype)
    if element is None:
        return 0
    if element.name == "string":  # every element is a Python object, repeated ones included
        count = 1
        for dim in proto.tensor_shape.dim[:MAX_RANK]:
            count *= max(dim.size, 0)
        return max(count, len(proto.string_val)) * STRING_ELEMENT_BYTES
    if proto.tensor_content:
        return 0
    return len(getattr(proto, VALUE_FIELD[proto.dtype])) * element_bytes(element)


def _typed_values(values: Sequence, dtype: np.dtype, tf_dtype: int, what: str) -> np.ndarray:
    if tf_dtype == types_pb2.DT_HALF:
        bits = np.array(values, dtype=np.int64)
        if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
            raise InvalidArgument(f"{what}: half_val holds 16-bit patterns; {bits.max()} is not one")
        return bits.astype(np.uint16).view(np.float16)
    if dtype.kind in "iu":
        wide = np.array(values, dtype=np.uint64 if dtype.kind == "u" and dtype.itemsize == 8 else np.int64)
        limits = np.iinfo(dtype)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidArgument(
                f"{what}: values outside the {dtype_name(tf_dtype)} range [{limits.min}, {limits.max}]"
            )
        return wide.astype(dtype)
    return np.array(values, dtype=dtype)


def tensor_proto_from_array(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A TensorProto of a numpy array: raw bytes in tensor_content, strings in string_val."""
    element = element_type_of(array)
    proto = tensor_pb2.TensorProto(dtype=element.tf, tensor_shape=shape_proto(array.shape))
    if element.name == "string":
        proto.string_val.extend(item.encode() if isinstance(item, str) else bytes(item) for item in array.reshape(-1))
    else:
        proto.tensor_content = raw_of(array)
    return proto
