"""Unit tests of the protocol tensor conversions: OIP raw and typed contents, TensorFlow TensorProto.

No servers. Never imports the `inference` proto package (test modules that use tritonclient share this process,
and the two cannot be loaded together): OIP tensors are duck-typed SimpleNamespace objects here.
"""

import struct
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from modelgrid.client.errors import InvalidArgument
from services.predictor.protocols import oip_tensors, tf_tensors
from services.predictor.protocols.tf_tensors import array_from_tensor_proto, shape_proto, tensor_proto_from_array


def oip_input(name: str, datatype: str, shape: list[int], **contents) -> SimpleNamespace:
    return SimpleNamespace(name=name, datatype=datatype, shape=shape, contents=SimpleNamespace(**contents))


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# -- Open Inference Protocol ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("BOOL", "bool_contents", [True, False, True, True], np.bool_),
        ("INT8", "int_contents", [-128, 0, 1, 127], np.int8),
        ("INT16", "int_contents", [-3, 0, 1, 300], np.int16),
        ("INT32", "int_contents", [-(2**31), 0, 1, 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**63), 0, 1, 2**63 - 1], np.int64),
        ("UINT8", "uint_contents", [0, 1, 2, 255], np.uint8),
        ("UINT16", "uint_contents", [0, 1, 2, 65535], np.uint16),
        ("UINT32", "uint_contents", [0, 1, 2, 2**32 - 1], np.uint32),
        ("UINT64", "uint64_contents", [0, 1, 2, 2**64 - 1], np.uint64),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 4.0], np.float32),
        ("FP64", "fp64_contents", [0.1, -1.25, 3.0, 1e300], np.float64),
    ],
)
def test_oip_typed_contents_decode_to_the_datatype(datatype, field, values, dtype):
    array = oip_tensors.array_from_contents(datatype, [2, 2], SimpleNamespace(**{field: values}), "input 'x'")
    assert array.dtype == np.dtype(dtype)
    assert array.shape == (2, 2)
    np.testing.assert_array_equal(array, np.array(values, dtype=dtype).reshape(2, 2))


def test_oip_typed_contents_accept_a_mapping_of_lists():
    array = oip_tensors.array_from_contents("FP32", [1, 3], {"fp32_contents": [1, 2, 3]}, "input 'x'")
    np.testing.assert_array_equal(array, np.array([[1, 2, 3]], dtype=np.float32))


def test_oip_bytes_typed_and_raw_decode_to_object_arrays():
    typed = oip_tensors.array_from_contents("BYTES", [2], SimpleNamespace(bytes_contents=[b"ab", b""]), "input 's'")
    raw = oip_tensors.array_from_raw_contents("BYTES", [2], length_prefixed(b"ab", b""), "input 's'")
    for array in (typed, raw):
        assert array.dtype == object
        assert array.tolist() == [b"ab", b""]


def test_oip_raw_contents_decode_little_endian():
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = oip_tensors.array_from_raw_contents("FP32", [2, 3], expected.astype("<f4").tobytes(), "input 'x'")
    np.testing.assert_array_equal(array, expected)
    half = np.array([1.5, -2.0], dtype=np.float16)
    np.testing.assert_array_equal(oip_tensors.array_from_raw_contents("FP16", [2], half.tobytes(), "x"), half)


def test_oip_inputs_read_raw_contents_in_input_order():
    inputs = [oip_input("a", "INT64", [1, 2]), oip_input("b", "BYTES", [1])]
    raw = [np.array([[7, 8]], dtype="<i8").tobytes(), length_prefixed(b"hello")]
    arrays = oip_tensors.arrays_from_inputs(inputs, raw)
    np.testing.assert_array_equal(arrays["a"], [[7, 8]])
    assert arrays["b"].tolist() == [b"hello"]


def test_oip_inputs_read_typed_contents_without_raw():
    arrays = oip_tensors.arrays_from_inputs([oip_input("x", "FP32", [1, 2], fp32_contents=[1.0, 2.0])], [])
    np.testing.assert_array_equal(arrays["x"], np.array([[1.0, 2.0]], dtype=np.float32))


@pytest.mark.parametrize(
    ("inputs", "raw", "message"),
    [
        ([oip_input("x", "FP33", [1], fp32_contents=[1.0])], [], "unknown datatype 'FP33'"),
        ([oip_input("x", "FP32", [2, 3], fp32_contents=[1.0] * 5)], [], "5 values in fp32_contents do not match"),
        ([oip_input("x", "FP32", [2], fp64_contents=[1.0, 2.0])], [], "carries its elements in fp32_contents"),
        ([oip_input("x", "FP16", [1])], [], "FP16 has no typed contents field"),
        ([oip_input("x", "INT8", [1], int_contents=[300])], [], "outside the INT8 range"),
        ([oip_input("x", "FP32", [-1])], [b""], "negative dimension"),
        ([oip_input("x", "FP32", [2, 3])], [b"\0" * 20], "20 bytes do not match shape [2, 3] of float32 (24 bytes)"),
        ([oip_input("x", "BYTES", [2])], [length_prefixed(b"a")], "end before all elements"),
        ([oip_input("x", "FP32", [1], fp32_contents=[1.0])], [b"\0" * 4], "use one or the other"),
        ([oip_input("x", "FP32", [1]), oip_input("y", "FP32", [1])], [b"\0" * 4], "2 inputs"),
        ([oip_input("x", "FP32", [0]), oip_input("x", "FP32", [0])], [], "more than once"),
    ],
)
def test_oip_bad_inputs_raise_invalid_argument_with_the_reason(inputs, raw, message):
    with pytest.raises(InvalidArgument) as err:
        oip_tensors.arrays_from_inputs(inputs, raw)
    assert message in str(err.value)


def test_oip_raw_output_round_trips_through_raw_input_decoding():
    arrays = [np.arange(6, dtype=np.int32).reshape(3, 2), np.array([[True, False]]), np.array([b"x", b"yz"], object)]
    for array in arrays:
        datatype, shape, raw = oip_tensors.raw_output(array)
        decoded = oip_tensors.array_from_raw_contents(datatype, shape, raw, "output")
        assert shape == list(array.shape)
        np.testing.assert_array_equal(decoded, array)
    assert oip_tensors.raw_output(np.zeros((1, 3), np.float32))[0] == "FP32"
    assert oip_tensors.raw_output(np.array([b"a"], object))[0] == "BYTES"


# -- TensorFlow TensorProto -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.arange(6, dtype=np.float64).reshape(2, 3) * 1e100,
        np.array([[-128, 127]], dtype=np.int8),
        np.array([1, -2, 3], dtype=np.int16),
        np.array([[1, -(2**31)]], dtype=np.int32),
        np.array([2**62, -5], dtype=np.int64),
        np.array([0, 255], dtype=np.uint8),
        np.array([0, 65535], dtype=np.uint16),
        np.array([[2**32 - 1]], dtype=np.uint32),
        np.array([2**64 - 1, 0], dtype=np.uint64),
        np.array([1.5, -0.25], dtype=np.float16),
        np.array([[True, False], [False, True]]),
        np.array(3.5, dtype=np.float32),
        np.zeros((0, 4), dtype=np.float32),
    ],
    ids=lambda a: f"{a.dtype}{list(a.shape)}",
)
def test_tensor_proto_round_trips_with_tensorflow(array):
    ours = tensor_proto_from_array(array)
    np.testing.assert_array_equal(tf.make_ndarray(ours), array)
    assert tf.make_ndarray(ours).dtype == array.dtype
    theirs = tf.make_tensor_proto(array)  # tensor_content for most types, typed *_val for bool and scalars
    decoded = array_from_tensor_proto(theirs)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_tensor_proto_strings_use_string_val_both_ways():
    array = np.array([[b"ab", "c\u00e9".encode()], [b"", b"x"]], dtype=object)
    ours = tensor_proto_from_array(array)
    assert not ours.tensor_content
    assert list(ours.string_val) == [b"ab", "c\u00e9".encode(), b"", b"x"]
    assert tf.make_ndarray(ours).tolist() == array.tolist()
    assert array_from_tensor_proto(tf.make_tensor_proto(array)).tolist() == array.tolist()
    assert array_from_tensor_proto(tf.make_tensor_proto(["a", "b"])).tolist() == [b"a", b"b"]


@pytest.mark.parametrize(
    ("value", "dtype", "shape"),
    [
        (1.5, tf.float32, [2, 3]),
        (2.0, tf.float64, [4]),
        (7, tf.int32, [2, 2]),
        (-3, tf.int8, [3]),
        (9, tf.int64, [1, 2]),
        (5, tf.uint32, [2]),
        (True, tf.bool, [2, 2]),
        (0.5, tf.float16, [3]),
        ("s", tf.string, [2]),
    ],
)
def test_tensor_proto_single_typed_value_broadcasts_like_tensorflow(value, dtype, shape):
    proto = tf.make_tensor_proto(value, dtype=dtype, shape=shape)
    assert not proto.tensor_content  # the value sits in the dtype's typed field, once
    decoded = array_from_tensor_proto(proto)
    expected = tf.make_ndarray(proto)
    assert decoded.shape == tuple(shape)
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)


def test_tensor_proto_typed_values_fill_with_the_last_and_default_to_zeros():
    shape = shape_proto([2, 3])
    partial = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[1, 2])
    np.testing.assert_array_equal(array_from_tensor_proto(partial), tf.make_ndarray(partial))
    empty = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_shape=shape)
    np.testing.assert_array_equal(array_from_tensor_proto(empty), np.zeros((2, 3), np.int64))
    full = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, tensor_shape=shape, int_val=range(6))
    np.testing.assert_array_equal(array_from_tensor_proto(full), np.arange(6, dtype=np.int32).reshape(2, 3))


def test_tensor_proto_half_val_holds_float16_bit_patterns():
    values = np.array([1.0, -2.5], dtype=np.float16)
    proto = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_HALF, tensor_shape=shape_proto([2]), half_val=values.view(np.uint16).tolist()
    )
    np.testing.assert_array_equal(array_from_tensor_proto(proto), values)


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (tensor_pb2.TensorProto(dtype=types_pb2.DT_COMPLEX64, tensor_shape=shape_proto([1])), "DT_COMPLEX64"),
        (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto([-1])), "unknown (-1)"),
        (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1, 2]), "exceed shape []"),
        (
            tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto([2]), double_val=[1, 2]),
            "carries its elements in float_val",
        ),
        (
            tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto([2]), tensor_content=b"\0" * 4),
            "4 bytes do not match shape [2]",
        ),
        (
            tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape_proto([1]), tensor_content=b"ab"),
            "string_val, not tensor_content",
        ),
        (
            tensor_pb2.TensorProto(dtype=types_pb2.DT_INT8, tensor_shape=shape_proto([1]), int_val=[200]),
            "outside the DT_INT8 range",
        ),
    ],
)
def test_tensor_proto_bad_tensors_raise_invalid_argument_with_the_reason(proto, message):
    with pytest.raises(InvalidArgument) as err:
        array_from_tensor_proto(proto, "input 'x'")
    assert message in str(err.value)
    assert "input 'x'" in str(err.value)


def test_tensor_shape_proto_keeps_unknown_dimensions():
    assert [d.size for d in shape_proto([-1, 4]).dim] == [-1, 4]
    assert tf_tensors.dtype_name(types_pb2.DT_FLOAT) == "DT_FLOAT"
