"""The predictor end to end: real Consul, Redis and registry; SavedModels built with TensorFlow in the test,
pushed to the registry, served by a predictor subprocess, and called over its three protocols."""

import concurrent.futures
import io
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor, tensor_to_array
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.kit import tls
from services.kit.localinfra import ConsulAgent

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.7, 2.2], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)


def predict_request(ref: str, x: np.ndarray, **inputs: np.ndarray) -> pb.PredictRequest:
    """A PredictRequest of `ref` ("name", "name:3", "name@alias") with input "x" (and `inputs`)."""
    tensors = {"x": array_to_tensor(x), **{k: array_to_tensor(v) for k, v in inputs.items()}}
    return pb.PredictRequest(model=ref_to_pb(ref), inputs=tensors)


def predict(stub: predictor_pb2_grpc.PredictorStub, ref: str, x: np.ndarray, timeout: float = 30):
    """(version, y) of one Predict call."""
    reply = stub.Predict(predict_request(ref, x), timeout=timeout)
    return reply.version, tensor_to_array(reply.outputs["y"])


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, tf_reference):
    """Own Consul (so registry discovery sees only this module's registry), a registry, two models."""
    tmp = tmp_path_factory.mktemp("predictor")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        aliased, latest = unique("aliased"), unique("latest")
        refs = {}
        for seed in (1, 2):
            path = build_saved_model(tmp / f"model-{seed}", seed=seed)
            refs[seed] = tf_reference(path)
            client.ensure_model(aliased)
            client.push_savedmodel(aliased, path)
            client.ensure_model(latest)
            client.push_savedmodel(latest, path)
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=aliased, alias="production", version=1))
        predictor = launch.predictor(
            consul.http_url,
            redis_server.url,
            tmp,
            [{"name": aliased, "aliases": ["production"]}, {"name": latest, "latest": 2}],
            MAX_REQUEST_ROWS="1000",
            MAX_RECEIVE_MESSAGE_BYTES=str(1024 * 1024),
            MAX_QUEUE_DELAY_MS="5",
        )
        predictor_channel = predictor.channel()
        try:
            yield SimpleNamespace(
                consul=consul,
                registry=registry,
                client=client,
                predictor=predictor,
                aliased=aliased,
                latest=latest,
                refs=refs,
                stub=predictor_pb2_grpc.PredictorStub(predictor_channel),
                metrics_url=f"http://127.0.0.1:{predictor.env['MODELGRID_PREDICTOR_METRICS_PORT']}/metrics",
            )
        finally:
            predictor_channel.close()
            predictor.stop()
            channel.close()
            registry.stop()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def peak_rss_mib(process) -> int:
    """The highest resident memory a service process has had (VmHWM), in MiB."""
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) // 1024


# -- own API -------------------------------------------------------------------------------------------------


def test_predictions_match_tensorflow_called_directly(mesh):
    version, y = predict(mesh.stub, f"{mesh.aliased}@production", X)
    assert version == 1
    np.testing.assert_allclose(y, mesh.refs[1](X), rtol=1e-6)
    version, y = predict(mesh.stub, mesh.latest, X)  # no selector: the newest served version
    assert version == 2
    np.testing.assert_allclose(y, mesh.refs[2](X), rtol=1e-6)
    version, y = predict(mesh.stub, f"{mesh.latest}:1", X)
    assert version == 1
    np.testing.assert_allclose(y, mesh.refs[1](X), rtol=1e-6)


def test_list_models_and_metadata_show_versions_and_signature(mesh):
    models = {m.name: m for m in mesh.stub.ListModels(pb.ListModelsRequest()).models}
    assert [(v.version, v.state) for v in models[mesh.latest].versions] == [
        (2, pb.VERSION_STATE_AVAILABLE),
        (1, pb.VERSION_STATE_AVAILABLE),
    ]
    meta = mesh.stub.GetModelMetadata(pb.GetModelMetadataRequest(name=mesh.aliased))
    assert [(v.version, list(v.aliases)) for v in meta.versions] == [(1, ["production"])]
    assert [(s.name, s.dtype, list(s.shape)) for s in meta.inputs] == [("x", common_pb2.DATA_TYPE_FLOAT32, [-1, 4])]
    assert [s.name for s in meta.outputs] == ["y"]


def test_predict_stream_answers_each_request_by_id(mesh):
    requests = [
        pb.PredictStreamRequest(id=f"r{i}", request=predict_request(mesh.latest, X[i : i + 1])) for i in range(3)
    ]
    requests.append(pb.PredictStreamRequest(id="bad", request=predict_request(mesh.latest, X.astype(np.float64))))
    answers = {r.id: r for r in mesh.stub.PredictStream(iter(requests), timeout=30)}
    assert set(answers) == {"r0", "r1", "r2", "bad"}
    for i in range(3):
        y = tensor_to_array(answers[f"r{i}"].response.outputs["y"])
        np.testing.assert_allclose(y, mesh.refs[2](X[i : i + 1]), rtol=1e-6)
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "float32" in answers["bad"].error.message


def _wait_job(stub, job_id: str, timeout: float = 60) -> pb.BatchJob:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetBatchJob(pb.GetBatchJobRequest(id=job_id))
        if job.state not in (pb.BATCH_JOB_STATE_PENDING, pb.BATCH_JOB_STATE_RUNNING):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        time.sleep(0.1)


def test_batch_job_over_streamed_records_writes_results_to_the_registry(mesh, tmp_path):
    data = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    spec = pb.BatchJobSpec(model=common_pb2.ModelRef(name=mesh.aliased, alias="production"), batch_size=128)
    messages = [pb.BatchPredictRequest(spec=spec)] + [
        pb.BatchPredictRequest(records=pb.Records(inputs={"x": array_to_tensor(data[i : i + 250])}))
        for i in range(0, 1000, 250)
    ]
    job = mesh.stub.BatchPredict(iter(messages))
    assert job.state == pb.BATCH_JOB_STATE_PENDING and job.spec.input_digest
    done = _wait_job(mesh.stub, job.id)
    assert done.state == pb.BATCH_JOB_STATE_SUCCEEDED, done.error
    assert (done.version, done.total_records, done.done_records) == (1, 1000, 1000)
    mesh.client.download_blob(done.output_digest, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as results:
        np.testing.assert_allclose(results["y"], mesh.refs[1](data), rtol=1e-5)
    listed = mesh.stub.ListBatchJobs(pb.ListBatchJobsRequest())
    assert job.id in [j.id for j in listed.jobs]


def test_batch_job_over_a_registry_blob_and_its_errors(mesh, tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, x=X)
    (tmp_path / "in.npz").write_bytes(buffer.getvalue())
    digest = mesh.client.upload_blob(tmp_path / "in.npz").digest
    spec = pb.BatchJobSpec(model=common_pb2.ModelRef(name=mesh.latest, version=1), input_digest=digest)
    done = _wait_job(mesh.stub, mesh.stub.BatchPredict(iter([pb.BatchPredictRequest(spec=spec)])).id)
    assert done.state == pb.BATCH_JOB_STATE_SUCCEEDED, done.error
    assert code_of(mesh.stub.CancelBatchJob, pb.CancelBatchJobRequest(id=done.id)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    missing = pb.BatchJobSpec(model=common_pb2.ModelRef(name=mesh.latest), input_digest="0" * 64)
    assert code_of(mesh.stub.BatchPredict, iter([pb.BatchPredictRequest(spec=missing)])) == grpc.StatusCode.NOT_FOUND
    assert code_of(mesh.stub.GetBatchJob, pb.GetBatchJobRequest(id="nope")) == grpc.StatusCode.NOT_FOUND


def write_zeros_npz(path: Path, records: int) -> Path:
    """A compressed NPZ with x: float32[records, 4] of zeros, streamed to disk (never held in memory); it unpacks
    to about 200 times its size."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (records, 4)}
    left, chunk = records * 16, bytes(4 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


# -- other protocols -----------------------------------------------------------------------------------------


def test_tritonclient_metadata_and_infer_raw_and_typed(mesh):
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    # Triton's own client, with the operator certificate of the mesh (the predictor requires mTLS)
    operator = tls.InternalTLS(mesh.predictor.internal_tls_dir, "operator")
    cert, key = operator.pair()
    client = triton.InferenceServerClient(
        mesh.predictor.target,
        ssl=True,
        root_certificates=str(tls.cert_path(operator.directory, "ca")),
        private_key=str(key),
        certificate_chain=str(cert),
        channel_args=tls.expect("predictor"),
    )
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(mesh.latest, "2")
    meta = client.get_model_metadata(mesh.latest)
    assert sorted(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]

    inp = triton.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    result = client.infer(mesh.latest, [inp], model_version="1", outputs=[triton.InferRequestedOutput("y")])
    np.testing.assert_allclose(result.as_numpy("y"), mesh.refs[1](X), rtol=1e-6)
    assert result.get_response().model_version == "1"

    with mesh.predictor.channel() as channel:  # typed contents, built by hand
        request = service_pb2.ModelInferRequest(model_name=mesh.latest, model_version="2")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
        tensor.contents.fp32_contents.extend(X.reshape(-1).tolist())
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    y = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(y, mesh.refs[2](X), rtol=1e-6)

    with pytest.raises(triton.InferenceServerException) as err:
        client.infer("no-such-model", [inp])
    assert "NOT_FOUND" in str(err.value.status())


def test_tensorflow_serving_client_predict_with_version_label(mesh):
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

    with mesh.predictor.channel() as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = mesh.aliased
        request.model_spec.version_label = "production"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
        reply = stub.Predict(request, timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(reply.outputs["y"]), mesh.refs[1](X), rtol=1e-6)
        assert reply.model_spec.version.value == 1

        request.model_spec.ClearField("version_label")
        request.model_spec.name = mesh.latest
        request.model_spec.version.value = 1
        np.testing.assert_allclose(tf.make_ndarray(stub.Predict(request).outputs["y"]), mesh.refs[1](X), rtol=1e-6)

        meta_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        meta_request.model_spec.name = mesh.latest
        meta = stub.GetModelMetadata(meta_request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        meta.metadata["signature_def"].Unpack(signatures)
        assert list(signatures.signature_def["serving_default"].inputs) == ["x"]


# -- hot swap ------------------------------------------------------------------------------------------------


def test_alias_move_swaps_versions_under_load_with_no_failed_call(mesh):
    stop = threading.Event()
    answers: list[int] = []
    calls: list[tuple[float, float, int]] = []  # (sent, answered, version) on time.monotonic()
    failures: list[str] = []

    def keep_calling():
        with mesh.predictor.channel() as channel:
            stub = predictor_pb2_grpc.PredictorStub(channel)
            while not stop.is_set():
                try:
                    sent = time.monotonic()
                    version = predict(stub, f"{mesh.aliased}@production", X[:1])[0]
                    calls.append((sent, time.monotonic(), version))
                    answers.append(version)
                except grpc.RpcError as err:
                    failures.append(f"{err.code()}: {err.details()}")

    callers = [threading.Thread(target=keep_calling) for _ in range(4)]
    for caller in callers:
        caller.start()
    try:
        time.sleep(0.5)
        moved = time.monotonic()
        mesh.client.stub.SetAlias(rpb.SetAliasRequest(model_name=mesh.aliased, alias="production", version=2))
        deadline = time.monotonic() + 60
        while not answers or answers[-1] != 2:
            assert time.monotonic() < deadline, "the alias move never reached the predictor"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for caller in callers:
            caller.join()
    assert failures == []
    assert {version for _, _, version in calls} == {1, 2}
    assert all(answered > moved for _, answered, version in calls if version == 2)  # nothing new before the move
    # Once a caller has seen version 2, every call sent after that gets version 2 (calls sent earlier may still
    # finish on version 1: the old version answers what it took before the swap).
    first_new = min(answered for _, answered, version in calls if version == 2)
    assert {version for sent, _, version in calls if sent > first_new} == {2}
    deadline = time.monotonic() + 30
    while True:
        meta = mesh.stub.GetModelMetadata(pb.GetModelMetadataRequest(name=mesh.aliased))
        if [v.version for v in meta.versions] == [2]:
            break
        assert time.monotonic() < deadline, f"version 1 was never unloaded: {meta}"
        time.sleep(0.2)
    assert list(meta.versions[0].aliases) == ["production"]


# -- batching, health, registration --------------------------------------------------------------------------


def _histogram(metrics_text: str, name: str, model: str) -> tuple[float, float]:
    """(sum, count) of a histogram for one model, summed over versions."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_sum{{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith(f"{name}_count{{") and f'model="{model}"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def test_concurrent_callers_are_served_in_batches_with_their_own_results(mesh):
    rows = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    before = _histogram(httpx.get(mesh.metrics_url).text, "modelgrid_predictor_batch_size", mesh.latest)

    def call(i):
        with mesh.predictor.channel() as channel:
            return i, predict(predictor_pb2_grpc.PredictorStub(channel), f"{mesh.latest}:2", rows[i : i + 1])[1]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for _ in range(3):
            for i, y in pool.map(call, range(64)):
                np.testing.assert_allclose(y, mesh.refs[2](rows[i : i + 1]), rtol=1e-6)
    after = _histogram(httpx.get(mesh.metrics_url).text, "modelgrid_predictor_batch_size", mesh.latest)
    requests, batches = after[0] - before[0], after[1] - before[1]
    assert requests == 192
    assert requests / batches > 1.5, f"{requests} requests ran in {batches} batches"


def test_registration_carries_served_models_and_per_model_health(mesh):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    entries = httpx.get(
        f"{mesh.consul.http_url}/v1/health/service/predictor",
        params={"passing": "true"},
        headers={"X-Consul-Token": mesh.consul.master_token},
    ).json()
    (entry,) = [e for e in entries if e["Service"]["Port"] == mesh.predictor.port]
    tags = set(entry["Service"]["Tags"])
    assert {f"model={mesh.latest}", f"version={mesh.latest}:1", f"version={mesh.latest}:2"} <= tags
    assert f"model={mesh.aliased}" in tags
    with mesh.predictor.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=f"model/{mesh.latest}"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_load_and_unload_model_at_run_time(mesh, unique):
    name = unique("loaded")
    mesh.client.ensure_model(name)
    for seed in (1, 2):
        mesh.client.push_savedmodel(name, mesh.refs[seed].path)
    specific = pb.VersionPolicy(specific=pb.Versions(versions=[1]))
    status = mesh.stub.LoadModel(pb.LoadModelRequest(name=name, policy=specific, wait=True))
    assert [(v.version, v.state) for v in status.versions] == [(1, pb.VERSION_STATE_AVAILABLE)]
    assert predict(mesh.stub, name, X)[0] == 1

    status = mesh.stub.LoadModel(pb.LoadModelRequest(name=name, wait=True))  # default policy: the latest version
    assert predict(mesh.stub, name, X)[0] == 2
    deadline = time.monotonic() + 30
    while [v.version for v in status.versions] != [2]:
        assert time.monotonic() < deadline, f"version 1 was never unloaded: {status}"
        time.sleep(0.2)
        status = mesh.stub.GetModelMetadata(pb.GetModelMetadataRequest(name=name))

    mesh.stub.UnloadModel(pb.UnloadModelRequest(name=name))
    assert code_of(mesh.stub.Predict, predict_request(name, X)) == grpc.StatusCode.NOT_FOUND
    status = mesh.stub.LoadModel(pb.LoadModelRequest(name="never-registered", wait=True))
    assert "not found" in status.reason and not status.versions
    mesh.stub.UnloadModel(pb.UnloadModelRequest(name="never-registered"))
    assert code_of(mesh.stub.UnloadModel, pb.UnloadModelRequest(name="never-registered")) == grpc.StatusCode.NOT_FOUND


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_request, fragment",
    [
        (lambda m: predict_request(m, X.astype(np.int32)), "dtype int32, expected float32"),
        (lambda m: predict_request(m, np.zeros((2, 5), np.float32)), "shape [2, 5], expected [-1, 4]"),
        (lambda m: predict_request(m, X, extra=X), "unknown inputs ['extra']"),
        (lambda m: predict_request(m, np.zeros((1001, 4), np.float32)), "MAX_REQUEST_ROWS"),
        (
            lambda m: pb.PredictRequest(
                model=common_pb2.ModelRef(name=m),
                inputs={"x": common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2, 4], raw_data=b"\0" * 7)},
            ),
            "do not match shape",
        ),
        (
            lambda m: pb.PredictRequest(
                model=common_pb2.ModelRef(name=m),
                inputs={"x": common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2**62, 4])},
            ),
            "more elements than any tensor can hold",
        ),
    ],
)
def test_bad_inputs_are_invalid_argument_with_the_signature(mesh, make_request, fragment):
    with pytest.raises(grpc.RpcError) as err:
        mesh.stub.Predict(make_request(mesh.latest))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


def test_unknown_model_version_alias_and_oversize_message(mesh):
    assert code_of(mesh.stub.Predict, predict_request("no-such-model", X)) == grpc.StatusCode.NOT_FOUND
    assert code_of(mesh.stub.Predict, predict_request(f"{mesh.latest}:9", X)) == grpc.StatusCode.NOT_FOUND
    assert code_of(mesh.stub.Predict, predict_request(f"{mesh.latest}@canary", X)) == grpc.StatusCode.NOT_FOUND
    huge = np.zeros((900, 400), np.float32)  # 1.4 MB > the 1 MiB message limit set for this predictor
    request = pb.PredictRequest(model=common_pb2.ModelRef(name=mesh.latest), inputs={"x": array_to_tensor(huge)})
    assert code_of(mesh.stub.Predict, request) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tensorflow_serving_tiny_requests_declaring_huge_tensors_are_refused_at_once(mesh):
    """A few bytes of TensorProto may declare any shape (TF fills missing values with the last one, or zeros): the
    predictor refuses from the shape, before allocating, and stays small."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def request(shape: list[int], **values) -> predict_pb2.PredictRequest:
        dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **values
        )
        message = predict_pb2.PredictRequest(inputs={"x": tensor})
        message.model_spec.name = mesh.latest
        return message

    before = peak_rss_mib(mesh.predictor)
    with mesh.predictor.channel() as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for shape, values, code in [
            ([100_000_000], {"float_val": [1.0]}, grpc.StatusCode.RESOURCE_EXHAUSTED),  # 400 MB from 17 bytes
            ([2**40], {}, grpc.StatusCode.RESOURCE_EXHAUSTED),
            ([2**62, 4], {}, grpc.StatusCode.INVALID_ARGUMENT),  # more elements than int64 counts
        ]:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(request(shape, **values), timeout=10)
            assert time.monotonic() - started < 1.0
            assert err.value.code() == code, err.value.details()
            assert "MAX_REQUEST_BYTES" in err.value.details() or "more elements" in err.value.details()
        broadcast = stub.Predict(request([3, 4], float_val=[0.5]), timeout=30)  # TF's fill rule still works
        y = np.frombuffer(broadcast.outputs["y"].tensor_content, dtype="<f4").reshape(3, 3)
        np.testing.assert_allclose(y, mesh.refs[2](np.full((3, 4), 0.5, np.float32)), rtol=1e-6)
    assert peak_rss_mib(mesh.predictor) - before < 128, "the predictor allocated the declared tensor"


def test_oip_shapes_that_overflow_or_do_not_match_their_contents_are_invalid_argument(mesh):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request(shape: list[int], raw: bytes | None = None, values: list[float] = ()) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name=mesh.latest)
        tensor = message.inputs.add(name="x", datatype="FP32", shape=shape)
        if raw is None:
            tensor.contents.fp32_contents.extend(values)
        else:
            message.raw_input_contents.append(raw)
        return message

    with mesh.predictor.channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for message, fragment in [
            (request([2**62, 4], raw=b""), "more elements than any tensor can hold"),
            (request([2**40], raw=b"\0" * 16), "16 bytes do not match shape [1099511627776]"),
            (request([2**40], values=[1.0]), "1 values in fp32_contents do not match shape [1099511627776]"),
            (request([3, 4], values=[1.0, 2.0, 3.0]), "3 values in fp32_contents do not match shape [3, 4]"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(message, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in err.value.details()


# -- queue limits and deadlines (a slow model, a tiny queue) -------------------------------------------------


@pytest.fixture(scope="module")
def slow(mesh, redis_server, tmp_path_factory, launch, unique, build_saved_model):
    tmp = tmp_path_factory.mktemp("slow")
    name = unique("slow")
    mesh.client.ensure_model(name)
    mesh.client.push_savedmodel(name, build_saved_model(tmp / "slow", busy_loops=600))
    limits = {"MAX_QUEUE_DEPTH": "2", "MAX_BATCH_SIZE": "1", "WARMUP_REQUESTS": "1"}
    predictor = launch.predictor(mesh.consul.http_url, redis_server.url, tmp, [{"name": name}], **limits)
    channel = predictor.channel()
    yield SimpleNamespace(
        name=name,
        predictor=predictor,
        stub=predictor_pb2_grpc.PredictorStub(channel),
        metrics_url=f"http://127.0.0.1:{predictor.env['MODELGRID_PREDICTOR_METRICS_PORT']}/metrics",
    )
    channel.close()
    predictor.stop()


def _codes_of_concurrent_calls(slow, count: int, timeout: float = 30) -> list[grpc.StatusCode]:
    barrier = threading.Barrier(count)

    def call(_):
        barrier.wait()
        try:
            slow.stub.Predict(predict_request(slow.name, X[:1]), timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def test_full_queue_is_resource_exhausted_at_once(slow):
    codes = _codes_of_concurrent_calls(slow, 10)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= 2  # one executing, up to two queued


def test_a_request_whose_deadline_passes_in_the_queue_is_not_executed(slow):
    def server_count(code: str) -> float:
        text = httpx.get(slow.metrics_url).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("modelgrid_predictor_requests_total{") and f'code="{code}"' in line
        )

    executed_before = _histogram(httpx.get(slow.metrics_url).text, "modelgrid_predictor_batch_size", slow.name)[1]
    expired_before = server_count("DEADLINE_EXCEEDED")
    busy = slow.stub.Predict.future(predict_request(slow.name, X[:1]), timeout=30)  # occupies the model
    time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        slow.stub.Predict(predict_request(slow.name, X[:1]), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    busy.result()
    deadline = time.monotonic() + 10
    while server_count("DEADLINE_EXCEEDED") == expired_before:  # the server saw it expire in its queue
        assert time.monotonic() < deadline, "the predictor never reported the expired request"
        time.sleep(0.1)
    executed = _histogram(httpx.get(slow.metrics_url).text, "modelgrid_predictor_batch_size", slow.name)[1]
    assert executed - executed_before == 1  # only the busy request ran


def test_a_bulk_job_over_an_npz_bomb_fails_clearly_without_unpacking_it(slow, mesh, tmp_path):
    """On the slow model's predictor: it keeps the default message limits (mesh's 1 MiB limit also bounds its
    registry downloads) and the default MAX_BULK_INPUT_BYTES (1 GiB)."""
    bomb = write_zeros_npz(tmp_path / "bomb.npz", (1024 + 64) * 2**20 // 16)  # 1.06 GiB unpacked, ~5 MB packed
    assert bomb.stat().st_size < 16 * 2**20
    digest = mesh.client.upload_blob(bomb).digest
    before = peak_rss_mib(slow.predictor)
    spec = pb.BatchJobSpec(model=common_pb2.ModelRef(name=slow.name), input_digest=digest)
    failed = _wait_job(slow.stub, slow.stub.BatchPredict(iter([pb.BatchPredictRequest(spec=spec)])).id)
    assert failed.state == pb.BATCH_JOB_STATE_FAILED
    assert "unpacks to 1140850816 bytes" in failed.error and "MAX_BULK_INPUT_BYTES" in failed.error, failed.error
    assert failed.total_records == 0
    assert peak_rss_mib(slow.predictor) - before < 256, "the predictor unpacked the bomb"
    slow.stub.Predict(predict_request(slow.name, X[:1]), timeout=30)  # the replica goes on serving


def test_a_model_that_fails_to_load_reports_why_and_the_others_keep_serving(mesh, tmp_path, unique):
    name = unique("broken")
    mesh.client.ensure_model(name)
    (tmp_path / "not-a-model").write_bytes(b"these bytes are no SavedModel")
    mesh.client.push_file(name, tmp_path / "not-a-model")
    status = mesh.stub.LoadModel(pb.LoadModelRequest(name=name, wait=True))
    (version,) = status.versions
    assert version.state == pb.VERSION_STATE_FAILED
    assert version.reason, "a failed version must say why"
    assert code_of(mesh.stub.Predict, predict_request(name, X)) == grpc.StatusCode.UNAVAILABLE
    assert predict(mesh.stub, f"{mesh.latest}:2", X)[0] == 2
    mesh.stub.UnloadModel(pb.UnloadModelRequest(name=name))
