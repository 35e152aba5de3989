"""Request tensors are bounded before anything is allocated for them, the same way in the predictor's own API, the
Open Inference Protocol and TensorFlow Serving: shapes no tensor can have are INVALID_ARGUMENT (never INTERNAL), a
shape must match the values sent, and what a request's tensors take once decoded is charged to a per-request
budget (RESOURCE_EXHAUSTED). Bulk NPZ inputs are sized from their zip directory and .npy headers before anything
is decompressed. Large string conversions leave the event loop.

No servers (except the bulk job test, which runs a real job in process). Like test_protocol_tensors, never imports
the `inference` proto package: OIP tensors are duck-typed SimpleNamespace objects.
"""

import asyncio
import io
import struct
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from modelgrid.client.errors import InvalidArgument, ModelgridError, ResourceExhausted
from modelgrid.client.modelref import ModelRef
from modelgrid.client.tensors import MAX_RANK, SizeBudget, element_count
from modelgrid.common.v1 import common_pb2
from services.kit.interceptors import status_of
from services.kit.redis_client import create_redis
from services.predictor import converters
from services.predictor.batch_jobs import BatchJobs, JobState, _load_npz, check_npz
from services.predictor.domain import VersionPolicy
from services.predictor.inference import Inference
from services.predictor.metrics import PredictorMetrics
from services.predictor.protocols import oip_tensors, tf_tensors
from services.predictor.protocols.tf_tensors import array_from_tensor_proto, shape_proto
from services.predictor.settings import DEFAULT_MAX_REQUEST_BYTES, MAX_REQUEST_BYTES_SETTING, PredictorSettings

MiB = 1 << 20
LIMIT = MiB
"""The budget these tests give a request."""
SETTING = "MODELGRID_PREDICTOR_MAX_REQUEST_BYTES"


def budget(limit: int = LIMIT) -> SizeBudget:
    return converters.request_budget(limit)


def oip_input(name: str, datatype: str, shape: list[int], **contents) -> SimpleNamespace:
    return SimpleNamespace(name=name, datatype=datatype, shape=shape, contents=SimpleNamespace(**contents))


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def tf_proto(dtype: int, shape: list[int], **values) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto(shape), **values)


def refused(call: Callable[[], object], error: type[ModelgridError]) -> tuple[str, float, int]:
    """(message, seconds, peak bytes traced) of a call that must raise `error` and nothing else."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ModelgridError) as err:
            call()
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(err.value) is error, f"{type(err.value).__name__}: {err.value}"
    return str(err.value), elapsed, peak


def test_the_settings_default_to_the_limits_the_code_uses():
    settings = PredictorSettings()
    assert settings.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 256 * MiB
    assert settings.max_bulk_input_bytes == 1024 * MiB
    assert MAX_REQUEST_BYTES_SETTING == SETTING
    assert status_of(ResourceExhausted("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT


# -- the shared checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "count"),
    [([], 1), ([0, 5], 0), ([2, 3], 6), ([2**30, 2**29], 2**59), ([2**40, 0], 0), ([1] * MAX_RANK, 1)],
)
def test_element_count_is_exact(shape, count):
    assert element_count(shape, "input 'x'") == count


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([2**62, 4], "more elements than any tensor can hold"),
        ([2**63 - 1, 2**63 - 1], "more elements than any tensor can hold"),
        ([0, 2**62, 2**62], "more elements than any tensor can hold"),  # empty, but numpy cannot make it
        ([3, -1], "negative dimension"),
        ([1] * (MAX_RANK + 1), f"at most {MAX_RANK}"),
    ],
)
def test_shapes_no_tensor_can_have_are_invalid_argument(shape, fragment):
    with pytest.raises(InvalidArgument) as err:
        element_count(shape, "input 'x'")
    assert fragment in str(err.value)


def test_the_budget_covers_all_inputs_of_a_request_and_names_its_setting():
    spent = budget()
    spent.charge(600_000, "input 'a'")
    with pytest.raises(ResourceExhausted) as err:
        spent.charge(600_000, "input 'b'")
    message = str(err.value)
    assert "input 'b'" in message and "1200000 bytes" in message and f"{LIMIT} bytes" in message
    assert SETTING in message
    unlimited = SizeBudget(None)
    unlimited.charge(2**70, "x")


# -- TensorFlow Serving ----------------------------------------------------------------------------------------------


def test_tf_a_17_byte_tensor_declaring_a_huge_shape_allocates_nothing():
    proto = tf_proto(types_pb2.DT_FLOAT, [2**40])
    assert proto.ByteSize() < 20
    message, elapsed, peak = refused(lambda: array_from_tensor_proto(proto, "input 'x'", budget()), ResourceExhausted)
    assert elapsed < 0.5 and peak < MiB
    assert SETTING in message and "4398046511104 bytes" in message


def test_tf_one_value_broadcast_beyond_the_budget_is_refused_and_within_it_still_fills_the_shape():
    big = tf_proto(types_pb2.DT_FLOAT, [100_000_000], float_val=[1.0])
    _, elapsed, peak = refused(lambda: array_from_tensor_proto(big, "input 'x'", budget()), ResourceExhausted)
    assert elapsed < 0.5 and peak < MiB
    small = tf_proto(types_pb2.DT_FLOAT, [500, 100], float_val=[1.5, 2.5])  # 200 KB
    decoded = array_from_tensor_proto(small, "input 'x'", budget())
    np.testing.assert_array_equal(decoded, tf.make_ndarray(small))
    assert decoded[0, :3].tolist() == [1.5, 2.5, 2.5]


def test_tf_string_broadcast_counts_an_object_per_element():
    proto = tf_proto(types_pb2.DT_STRING, [2**20], string_val=[b"a"])  # 64 MiB of Python objects, 1 MiB budget
    _, _, peak = refused(lambda: array_from_tensor_proto(proto, "input 's'", budget()), ResourceExhausted)
    assert peak < MiB
    assert (
        array_from_tensor_proto(tf_proto(types_pb2.DT_STRING, [3], string_val=[b"a"]), "s", budget()).tolist()
        == [b"a"] * 3
    )


@pytest.mark.parametrize(
    "proto",
    [
        tf_proto(types_pb2.DT_FLOAT, [2**62, 4]),
        tf_proto(types_pb2.DT_FLOAT, [2**62, 4], tensor_content=b""),  # np.prod wrapped to 0 bytes: it "matched"
        tf_proto(types_pb2.DT_STRING, [2**62, 4], string_val=[b"a"]),
        tf_proto(types_pb2.DT_INT8, [0, 2**62, 2**62]),
    ],
)
def test_tf_shapes_overflowing_int64_are_invalid_argument_not_internal(proto):
    message, _, _ = refused(lambda: array_from_tensor_proto(proto, "input 'x'", budget()), InvalidArgument)
    assert "more elements than any tensor can hold" in message


def test_tf_tensor_content_must_match_a_huge_declared_shape():
    proto = tf_proto(types_pb2.DT_FLOAT, [2**40], tensor_content=b"\0" * 8)
    message, _, peak = refused(lambda: array_from_tensor_proto(proto, "input 'x'", budget()), InvalidArgument)
    assert "8 bytes do not match shape [1099511627776]" in message and peak < MiB


def test_tf_too_many_dimensions_and_negative_ones_are_invalid_argument():
    deep = tf_proto(types_pb2.DT_FLOAT, [1] * 100)
    assert "100 dimensions" in refused(lambda: array_from_tensor_proto(deep, "x", budget()), InvalidArgument)[0]
    negative = tf_proto(types_pb2.DT_FLOAT, [4, -7])
    assert "negative dimension" in refused(lambda: array_from_tensor_proto(negative, "x", budget()), InvalidArgument)[0]


def test_tf_error_messages_do_not_echo_values():
    proto = tf_proto(types_pb2.DT_STRING, [1], string_val=[b"secret-1", b"secret-2"])
    message, _, _ = refused(lambda: array_from_tensor_proto(proto, "input 'x'", budget()), InvalidArgument)
    assert "secret" not in message and "2 values in string_val exceed shape [1]" in message


# -- Open Inference Protocol -----------------------------------------------------------------------------------------


def test_oip_typed_contents_must_match_a_huge_declared_shape():
    inputs = [oip_input("x", "FP32", [2**40], fp32_contents=[1.0])]
    message, elapsed, peak = refused(lambda: oip_tensors.arrays_from_inputs(inputs, [], budget()), InvalidArgument)
    assert "1 values in fp32_contents do not match shape [1099511627776]" in message
    assert elapsed < 0.5 and peak < MiB


@pytest.mark.parametrize(
    ("inputs", "raw", "fragment"),
    [
        ([oip_input("x", "FP32", [2**62, 4])], [b""], "more elements than any tensor can hold"),
        ([oip_input("x", "FP32", [2**62, 4], fp32_contents=[])], [], "more elements than any tensor can hold"),
        ([oip_input("x", "FP32", [2**40])], [b"\0" * 4], "4 bytes do not match shape [1099511627776]"),
        ([oip_input("s", "BYTES", [2**40])], [length_prefixed(b"a")], "5 bytes cannot hold 1099511627776 elements"),
        ([oip_input("x", "FP32", [1] * 40)], [b"\0" * 4], "40 dimensions"),
    ],
)
def test_oip_shapes_that_overflow_or_do_not_match_are_invalid_argument(inputs, raw, fragment):
    message, _, peak = refused(lambda: oip_tensors.arrays_from_inputs(inputs, raw, budget()), InvalidArgument)
    assert fragment in message and peak < MiB


def test_oip_budget_covers_raw_and_typed_inputs_together():
    half = np.zeros(150_000, np.float32).tobytes()  # 600 KB each
    raw_inputs = [oip_input("a", "FP32", [150_000]), oip_input("b", "FP32", [150_000])]
    message, _, _ = refused(
        lambda: oip_tensors.arrays_from_inputs(raw_inputs, [half, half], budget()), ResourceExhausted
    )
    assert "input 'b'" in message and SETTING in message
    assert set(oip_tensors.arrays_from_inputs(raw_inputs[:1], [half], budget())) == {"a"}
    typed = [oip_input("x", "INT64", [200_000], int64_contents=[0] * 200_000)]  # 1.6 MB once decoded
    refused(lambda: oip_tensors.arrays_from_inputs(typed, [], budget()), ResourceExhausted)
    strings = [oip_input("s", "BYTES", [20_000])]  # 20000 elements of 64 bytes: over 1 MiB
    refused(
        lambda: oip_tensors.arrays_from_inputs(strings, [length_prefixed(*[b""] * 20_000)], budget()), ResourceExhausted
    )


def test_oip_long_names_are_cut_short_in_messages():
    name = "n" * 10_000
    message, _, _ = refused(
        lambda: oip_tensors.arrays_from_inputs([oip_input(name, "FP32", [2])], [b""], budget()), InvalidArgument
    )
    assert len(message) < 300 and "(10000 characters)" in message


# -- the predictor's own API ------------------------------------------------------------------------------------------


def own_tensor(dtype: int, shape: list[int], raw: bytes = b"") -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=shape, raw_data=raw)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (own_tensor(common_pb2.DATA_TYPE_FLOAT32, [2**62, 4]), "more elements than any tensor can hold"),
        (own_tensor(common_pb2.DATA_TYPE_FLOAT32, [2**40]), "0 bytes do not match shape [1099511627776]"),
        (own_tensor(common_pb2.DATA_TYPE_STRING, [2**40], length_prefixed(b"")), "cannot hold 1099511627776"),
        (own_tensor(common_pb2.DATA_TYPE_FLOAT32, [2, -2]), "negative dimension"),
    ],
)
def test_own_api_shapes_that_overflow_or_do_not_match_are_invalid_argument(tensor, fragment):
    message, _, peak = refused(lambda: converters.inputs_from_pb({"x": tensor}, LIMIT), InvalidArgument)
    assert fragment in message and peak < MiB


def test_own_api_budget_covers_all_inputs():
    half = np.zeros(150_000, np.float32).tobytes()
    inputs = {name: own_tensor(common_pb2.DATA_TYPE_FLOAT32, [150_000], half) for name in ("a", "b")}
    message, _, _ = refused(lambda: converters.inputs_from_pb(inputs, LIMIT), ResourceExhausted)
    assert SETTING in message
    assert set(converters.inputs_from_pb(inputs)) == {"a", "b"}  # the default limit: 256 MiB


# -- conversions off the event loop -------------------------------------------------------------------------------


def test_decode_work_counts_what_is_built_element_by_element():
    floats = np.zeros((64, 4), np.float32)
    assert tf_tensors.decode_work(tf.make_tensor_proto(floats)) == 0  # tensor_content: a view
    assert tf_tensors.decode_work(tf_proto(types_pb2.DT_FLOAT, [4], float_val=[1, 2, 3, 4])) == 16
    many_strings = tf_proto(types_pb2.DT_STRING, [100_000], string_val=[b"ab"])
    assert tf_tensors.decode_work(many_strings) >= converters.OFF_LOOP_BYTES
    assert tf_tensors.decode_work(tf_proto(types_pb2.DT_STRING, [2**62, 4])) > converters.OFF_LOOP_BYTES
    raw_strings = length_prefixed(*[b"abc"] * 50_000)
    assert oip_tensors.decode_work([oip_input("s", "BYTES", [50_000])], [raw_strings]) >= converters.OFF_LOOP_BYTES
    assert oip_tensors.decode_work([oip_input("x", "FP32", [64, 4])], [floats.tobytes()]) == 0
    assert oip_tensors.decode_work([oip_input("x", "FP32", [2], fp32_contents=[1.0, 2.0])], []) == 8
    assert converters.string_work([floats]) == 0
    assert converters.string_work([np.array([b"a"] * 20_000, dtype=object)]) >= converters.OFF_LOOP_BYTES


@pytest.mark.asyncio(loop_scope="session")
async def test_small_conversions_run_inline_and_large_ones_in_a_thread():
    loop_thread = threading.get_ident()
    assert await converters.run_conversion(converters.OFF_LOOP_BYTES - 1, threading.get_ident) == loop_thread
    assert await converters.run_conversion(converters.OFF_LOOP_BYTES, threading.get_ident) != loop_thread
    with pytest.raises(InvalidArgument):  # errors of a conversion in a thread reach the caller unchanged
        await converters.run_conversion(converters.OFF_LOOP_BYTES, lambda: element_count([2**62, 4], "input 'x'"))


# -- bulk NPZ inputs ---------------------------------------------------------------------------------------------


def write_zeros_npz(path: Path, shape: tuple[int, ...], dtype: str = "<f4", name: str = "x", data_bytes=None) -> Path:
    """A compressed NPZ of zeros with array `name` of `shape`, written in chunks (never held in memory): what
    np.savez_compressed writes, about 1/1000 of its unpacked size. `data_bytes`: write that much data instead of
    what the header declares (a forged file)."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    left = int(np.prod(shape)) * np.dtype(dtype).itemsize if data_bytes is None else data_bytes
    chunk = bytes(4 * MiB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def test_an_npz_bomb_is_refused_from_its_headers_before_decompressing(tmp_path):
    bomb = write_zeros_npz(tmp_path / "bomb.npz", (16 * MiB, 4))  # 256 MiB of float32 zeros
    assert bomb.stat().st_size < 2 * MiB
    message, elapsed, peak = refused(lambda: _load_npz(bomb, 64 * MiB), ResourceExhausted)
    assert "unpacks to 268435584 bytes" in message and "MODELGRID_PREDICTOR_MAX_BULK_INPUT_BYTES" in message
    assert elapsed < 0.5 and peak < MiB


def test_an_npz_whose_header_declares_more_than_its_member_holds_is_refused(tmp_path):
    forged = write_zeros_npz(tmp_path / "forged.npz", (2**28, 4), data_bytes=64)  # numpy would allocate 4 GiB
    message, _, peak = refused(lambda: _load_npz(forged, 64 * MiB), InvalidArgument)
    assert "declares 4294967296 bytes of data but its member holds" in message and peak < MiB


def test_npz_inputs_that_are_not_plain_arrays_are_refused(tmp_path):
    (tmp_path / "text.npz").write_bytes(b"not a zip at all")
    assert "not an NPZ file" in refused(lambda: check_npz(tmp_path / "text.npz", MiB), InvalidArgument)[0]
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("notes.txt", b"hello")
    assert "no .npy array" in refused(lambda: check_npz(tmp_path / "other.npz", MiB), InvalidArgument)[0]
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    (tmp_path / "objects.npz").write_bytes(buffer.getvalue())
    assert "Python objects" in refused(lambda: check_npz(tmp_path / "objects.npz", MiB), InvalidArgument)[0]
    with zipfile.ZipFile(tmp_path / "garbled.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00\x40\x00{'descr': '<f4'")  # header cut short
    assert "not a readable .npy array" in refused(lambda: check_npz(tmp_path / "garbled.npz", MiB), InvalidArgument)[0]


def test_an_npz_within_the_limit_loads(tmp_path):
    buffer = io.BytesIO()
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.arange(3)}
    np.savez_compressed(buffer, **arrays)
    (tmp_path / "ok.npz").write_bytes(buffer.getvalue())
    loaded = _load_npz(tmp_path / "ok.npz", MiB)
    assert set(loaded) == {"x", "ids"}
    np.testing.assert_array_equal(loaded["x"], arrays["x"])


@pytest.mark.asyncio(loop_scope="session")
async def test_a_bulk_job_over_an_npz_bomb_fails_with_a_clear_error_and_the_next_job_runs(
    control, registry_client, push, redis_server, unique, tmp_path
):
    name = unique("bulk")
    await push(name, 1)
    await control.load(name, VersionPolicy(), wait=True)
    redis = create_redis(redis_server.url)
    jobs = BatchJobs(
        redis,
        registry_client,
        Inference(control, PredictorMetrics(), max_request_rows=64),
        control,
        default_batch_size=64,
        max_records=1_000_000,
        max_input_bytes=16 * MiB,
        key_prefix=f"mg:unit:{unique('jobs')}:",
    )
    try:
        bomb = write_zeros_npz(tmp_path / "bomb.npz", (8 * MiB, 4))  # 128 MiB unpacked: 8M records of float32[4]
        bomb_digest = (await registry_client.upload_blob(bomb)).digest
        failed = await finished(jobs, await jobs.submit(ModelRef(name), bomb_digest, [], 0))
        assert failed.state == JobState.FAILED
        assert "unpacks to 134217856 bytes" in failed.error and "MAX_BULK_INPUT_BYTES" in failed.error
        assert failed.total_records == 0  # refused before the arrays were loaded

        good = tmp_path / "good.npz"
        np.savez_compressed(good, x=np.ones((10, 4), np.float32))
        done = await finished(
            jobs, await jobs.submit(ModelRef(name), (await registry_client.upload_blob(good)).digest, [], 0)
        )
        assert done.state == JobState.SUCCEEDED, done.error
        assert done.total_records == done.done_records == 10
    finally:
        await jobs.close()
        await redis.aclose()


async def finished(jobs: BatchJobs, job, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while (job := await jobs.get(job.id)).state in (JobState.PENDING, JobState.RUNNING):
        assert time.monotonic() < end, f"job {job.id} still {job.state}"
        await asyncio.sleep(0.05)
    return job
