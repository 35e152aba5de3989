"""Class 3, inputs bounded before allocation: a few bytes of request may declare any tensor shape; the predictor
refuses from the shape (INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never INTERNAL, at once), in its own API, the Open
Inference Protocol (KServe v2) and TensorFlow Serving's PredictionService, directly, through the gateway and over
gRPC-Web; a bulk job over a compressed NPZ bomb fails without unpacking it; and the predictor stays small and
healthy. The predictor here allows 1 MiB of decoded inputs per request and 1 MiB per bulk input."""

import time
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2
from tritonclient.grpc import service_pb2 as oip  # the project's own `inference` copy must not load here too

from modelgrid.client.tensors import array_to_tensor
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as ppb

MiB = 1 << 20
MESH = {
    "predictor": {
        "MAX_REQUEST_BYTES": str(MiB),
        "MAX_BULK_INPUT_BYTES": str(MiB),
        "MAX_REQUEST_ROWS": "10000000",  # the byte budget, not the row limit, is what these tests meet
    }
}
VIAS = ("direct", "gateway", "web")
OWN = "/modelgrid.predictor.v1.Predictor/Predict"
OIP = "/inference.GRPCInferenceService/ModelInfer"
TFS = "/tensorflow.serving.PredictionService/Predict"
PROTOCOLS = (OWN, OIP, TFS)
ANSWERED_WITHIN_S = 2.0
MAX_GROWTH_MIB = 200
"""How much the predictor's peak memory may grow during the module: far less than any declared tensor here."""


def peak_rss_mib(process) -> int:
    """The highest resident memory a service process has had (VmHWM), in MiB."""
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) // 1024


@pytest.fixture(scope="module")
def baseline(mesh) -> int:
    return peak_rss_mib(mesh.predictor)


@pytest.fixture(autouse=True)
def still_small_and_serving(mesh, baseline):
    """After each test: the predictor answers a real prediction and has not allocated what was declared."""
    yield
    mesh.assert_serving("predictor")
    x = np.ones((2, 4), np.float32)
    good = ppb.PredictRequest(model=common_pb2.ModelRef(name=mesh.model), inputs={"x": array_to_tensor(x)})
    mesh.unary("direct", OWN, good).assert_code(grpc.StatusCode.OK)
    assert peak_rss_mib(mesh.predictor) - baseline < MAX_GROWTH_MIB, "the predictor allocated a declared tensor"


def request(protocol: str, model: str, shape: list[int], *, values: list[float] | None = None, raw: bytes = b""):
    """A request of `protocol` for input x, float32 of `shape`, with `values` (typed) or `raw` bytes."""
    if protocol == TFS:
        dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims)
        )
        if values is not None:
            tensor.float_val.extend(values)
        else:
            tensor.tensor_content = raw
        message = predict_pb2.PredictRequest(inputs={"x": tensor})
        message.model_spec.name = model
        return message
    if protocol == OIP:
        message = oip.ModelInferRequest(model_name=model)
        tensor = message.inputs.add(name="x", datatype="FP32", shape=shape)
        if values is not None:
            tensor.contents.fp32_contents.extend(values)
        else:
            message.raw_input_contents.append(raw)
        return message
    data = raw if values is None else np.asarray(values, "<f4").tobytes()  # the own API has raw data only
    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=shape, raw_data=data)
    return ppb.PredictRequest(model=common_pb2.ModelRef(name=model), inputs={"x": tensor})


def refused(outcome, *codes: grpc.StatusCode):
    assert outcome.code in codes, f"{outcome.code.name}: {outcome.details}"
    assert outcome.seconds < ANSWERED_WITHIN_S, f"answered after {outcome.seconds:.1f}s"
    return outcome


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["own", "oip", "tf-serving"])
def test_a_tiny_request_declaring_a_huge_tensor_is_refused_before_allocation(mesh, via, protocol):
    """Class 3, memory exhaustion: 20-odd bytes declaring x float32 [25,000,000, 4] (400 MB) with one value (TF
    Serving fills the rest with it) or none are refused at once from the shape: RESOURCE_EXHAUSTED naming
    MAX_REQUEST_BYTES where the protocol may fill, INVALID_ARGUMENT where the values must match the shape."""
    for values in ([1.0], None):
        message = request(protocol, mesh.model, [25_000_000, 4], values=values)
        assert message.ByteSize() < 100
        outcome = refused(
            mesh.unary(via, protocol, message), grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
        )
        if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "MAX_REQUEST_BYTES" in outcome.details, outcome.details
        else:
            assert "do not match" in outcome.details or "does not match" in outcome.details, outcome.details


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["own", "oip", "tf-serving"])
@pytest.mark.parametrize("shape", [[2**62, 4], [2**31, 2**31, 2**31], [2**63 - 1, 2]], ids=str)
def test_an_element_count_overflow_is_invalid_argument(mesh, via, protocol, shape):
    """Class 3, integer overflow: dimensions whose product overflows 64 bits (it wraps to a small or negative
    count in fixed-width arithmetic) are INVALID_ARGUMENT, counted in Python integers."""
    for values in ([1.0], None):
        outcome = mesh.unary(via, protocol, request(protocol, mesh.model, shape, values=values))
        refused(outcome, grpc.StatusCode.INVALID_ARGUMENT).assert_code(
            grpc.StatusCode.INVALID_ARGUMENT, "more elements than any tensor can hold"
        )


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["own", "oip", "tf-serving"])
def test_a_request_over_max_request_bytes_is_resource_exhausted(mesh, via, protocol):
    """Class 3, memory exhaustion with real data: 2 MiB of float32 inputs (within gRPC's message limit, over the
    predictor's 1 MiB MAX_REQUEST_BYTES) are RESOURCE_EXHAUSTED naming the setting; 0.5 MiB are answered."""
    big = np.ones((131_072, 4), np.float32)
    message = request(protocol, mesh.model, list(big.shape), raw=big.tobytes())
    refused(mesh.unary(via, protocol, message), grpc.StatusCode.RESOURCE_EXHAUSTED).assert_code(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "MAX_REQUEST_BYTES"
    )
    small = big[:32_768]
    mesh.unary(via, protocol, request(protocol, mesh.model, list(small.shape), raw=small.tobytes())).assert_code(
        grpc.StatusCode.OK
    )


# -- bulk jobs ---------------------------------------------------------------------------------------------------


def zeros_npz(path: Path, records: int) -> Path:
    """A compressed NPZ with x: float32[records, 4] of zeros, written in chunks: it unpacks to ~1000x its size."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (records, 4)}
    left, chunk = records * 16, bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def forged_npz(path: Path) -> Path:
    """An NPZ whose x.npy header declares float32[2**28, 4] (4 GiB) over 16 bytes of data: its zip directory
    says it is small, and numpy would allocate the declared size before reading."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (2**28, 4)})
            member.write(bytes(16))
    return path


def bulk_job_error(mesh, via: str, digest: str) -> tuple[grpc.StatusCode, str]:
    """How a bulk job over the blob `digest` is refused: at submit (its status), or failed (its error)."""
    spec = ppb.BatchJobSpec(model=common_pb2.ModelRef(name=mesh.model), input_digest=digest)
    submitted = mesh.streamed(
        via, "/modelgrid.predictor.v1.Predictor/BatchPredict", [ppb.BatchPredictRequest(spec=spec)], kind="stream_unary"
    )
    if submitted.code != grpc.StatusCode.OK:
        return submitted.code, submitted.details
    job = ppb.BatchJob.FromString(submitted.replies[0])
    deadline = time.monotonic() + 30
    while job.state in (ppb.BATCH_JOB_STATE_PENDING, ppb.BATCH_JOB_STATE_RUNNING):
        assert time.monotonic() < deadline, f"job {job.id} still {job.state}"
        time.sleep(0.1)
        polled = mesh.unary(
            "direct", "/modelgrid.predictor.v1.Predictor/GetBatchJob", ppb.GetBatchJobRequest(id=job.id)
        )
        job = ppb.BatchJob.FromString(polled.assert_code(grpc.StatusCode.OK).replies[0])
    assert job.state == ppb.BATCH_JOB_STATE_FAILED, job
    assert job.total_records == 0
    return grpc.StatusCode.OK, job.error


@pytest.fixture(scope="module")
def bombs(mesh, tmp_path_factory) -> dict[str, str]:
    """Registry blobs: a zero bomb (64 MiB unpacked, some 64 KiB packed) and a forged-header NPZ."""
    tmp = tmp_path_factory.mktemp("bombs")
    client = mesh.registry_client()
    bomb = zeros_npz(tmp / "bomb.npz", 4 * MiB)
    assert bomb.stat().st_size < 256 * 1024
    return {
        "bomb": client.upload_blob(bomb).digest,
        "forged": client.upload_blob(forged_npz(tmp / "forged.npz")).digest,
    }


@pytest.mark.parametrize("via", VIAS)
def test_a_compressed_npz_bomb_in_a_bulk_job_is_refused_unopened(mesh, bombs, via):
    """Class 3, decompression bomb: a bulk job over a ~64 KiB NPZ that unpacks to 64 MiB (over the 1 MiB
    MAX_BULK_INPUT_BYTES) is refused from the zip directory, before anything is decompressed."""
    code, error = bulk_job_error(mesh, via, bombs["bomb"])
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, error)
    assert "unpacks to" in error and "MAX_BULK_INPUT_BYTES" in error, error


@pytest.mark.parametrize("via", VIAS)
def test_an_npz_whose_header_lies_about_its_size_is_refused(mesh, bombs, via):
    """Class 3, forged archive: an .npy header declaring 4 GiB over 16 bytes of data (a small zip directory) is
    refused as damaged or forged, before numpy would allocate the declared array."""
    code, error = bulk_job_error(mesh, via, bombs["forged"])
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, error)
    assert "damaged or forged" in error, error
