"""Fuzzing the trainer: every RPC of modelgrid.trainer.v1.Trainer with generated and malformed requests, and job
specs whose data set is a generated or damaged CSV/NPZ blob in the registry, against a real trainer process (own
Consul agent, a real registry, the session's Redis). Then the trainer must still be alive and SERVING.

No fuzzed job ever trains: the trainer runs with no worker agent, so an accepted job waits PENDING (nothing to
schedule it on), and each one is cancelled as soon as its SubmitJob answers."""

import hashlib
import io
import time
import uuid
import zipfile
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from hypothesis import strategies as st

from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.kit.localinfra import ConsulAgent
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow  # services as subprocesses (kept in the default run)

SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"]
METHODS = list(SERVICE.methods)
DIGITS = REPO_ROOT / "data" / "digits"
WATCH_S = 1.0  # WatchJob on a job that waits: one event or this deadline of ours
TIMEOUT_S = 15.0
RECIPE = '''
"""A file recipe for the fuzz targets (never run: no job of theirs is scheduled)."""


def build_model(input_shape, num_classes, units=8, **params):
    raise RuntimeError("not for running")
'''


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, channel_to, digits_spec):
    """Own Consul agent (no worker agent in it), a registry holding the digits NPZ as a blob, a trainer, one job
    left PENDING and one cancelled."""
    tmp = tmp_path_factory.mktemp("fuzz-trainer")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        with launch.together():
            registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
            trainer = launch.trainer(consul.http_url, redis_server.url, tmp, f"mg:fuzz-trainer:{uuid.uuid4().hex[:6]}:")
        (tmp / "recipes" / "fz.py").write_text(RECIPE)
        registry_channel, registry_client = client_for(registry)
        npz = registry_client.upload_blob(DIGITS / "digits.npz")
        channel = channel_to(trainer)
        stub = trainer_pb2_grpc.TrainerStub(channel)
        pending = submit_when_registry_found(stub, pb.SubmitJobRequest(spec=digits_spec(), request_id="fuzz-pending"))
        cancelled = stub.SubmitJob(pb.SubmitJobRequest(spec=digits_spec(workers=1)), timeout=60)
        stub.CancelJob(pb.CancelJobRequest(id=cancelled.id), timeout=30)
        try:
            yield SimpleNamespace(
                trainer=trainer,
                registry=registry,
                channel=channel,
                registry_channel=registry_channel,
                registry_client=registry_client,
                stub=stub,
                npz_digest=npz.digest,
                pending=pending.id,
                cancelled=cancelled.id,
                digits_spec=digits_spec,
            )
        finally:
            stub.CancelJob(pb.CancelJobRequest(id=pending.id), timeout=30)
            channel.close()
            registry_channel.close()
            trainer.stop()
            registry.stop()


def submit_when_registry_found(stub, request: pb.SubmitJobRequest, timeout: float = 60) -> pb.Job:
    """SubmitJob, tried again while the trainer has not yet seen the registry pass its first check in Consul."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return stub.SubmitJob(request, timeout=30)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def cancel_accepted(mesh, outcome) -> None:
    """Cancels the job a SubmitJob created (a repeated request id returns an older job, perhaps ended already)."""
    if outcome.code != grpc.StatusCode.OK or not outcome.responses:
        return
    job = pb.Job.FromString(outcome.responses[0])
    if job.id == mesh.pending:
        return
    try:
        mesh.stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=30)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), err


def seeds(mesh) -> dict[str, list]:
    spec = mesh.digits_spec()
    from_blob = mesh.digits_spec(dataset=pb.Dataset(blob_digest=mesh.npz_digest, format="npz"))
    from_csv = mesh.digits_spec(dataset=pb.Dataset(local_path=str(DIGITS / "digits.csv"), format="csv"))
    file_recipe = mesh.digits_spec(recipe="file:fz.py", workers=1)
    file_recipe.recipe_params.Clear()
    file_recipe.recipe_params.update({"units": 4})
    return {
        "SubmitJob": [
            pb.SubmitJobRequest(spec=spec, request_id="r1"),
            pb.SubmitJobRequest(spec=from_blob),
            pb.SubmitJobRequest(spec=from_csv),
            pb.SubmitJobRequest(spec=file_recipe),
        ],
        "GetJob": [pb.GetJobRequest(id=mesh.pending)],
        "ListJobs": [pb.ListJobsRequest(state=pb.JOB_STATE_PENDING, page_size=2, page_token="1")],
        "CancelJob": [pb.CancelJobRequest(id=mesh.cancelled)],
        "WatchJob": [pb.WatchJobRequest(id=mesh.pending, cursor="0-0"), pb.WatchJobRequest(id=mesh.cancelled)],
        "GetJobLogs": [pb.GetJobLogsRequest(id=mesh.pending, task_index=0, tail_lines=10)],
        "ListWorkers": [pb.ListWorkersRequest()],
    }


def hints(mesh) -> list[str]:
    return [
        mesh.pending,
        mesh.cancelled,
        mesh.npz_digest,
        str(DIGITS / "digits.npz"),
        str(DIGITS / "digits.csv"),
        str(DIGITS / ("a" * 300)),
        str(DIGITS / ".." / "digits" / "digits.npz"),
        str(DIGITS),
        "file:fz.py",
        "hidden_units",
        "dropout",
        "units",
        "label",
        "p0",
    ]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_trainer_rpc(method, mesh, fuzz, protofuzz):
    """Every RPC with generated, mutated and malformed requests: never INTERNAL or UNKNOWN, never a hang."""
    strategies = protofuzz(hints=hints(mesh))
    # CancelJob must not cancel the job the other targets look at.
    message_seeds = seeds(mesh).get(method.name, ())
    case = strategies.case(method, message_seeds)
    watch = method.name == "WatchJob"

    def body(request) -> None:
        if method.name == "CancelJob" and mesh.pending.encode() in request:
            return
        outcome = fuzz.call_method(
            mesh.channel,
            method,
            request,
            timeout=WATCH_S if watch else TIMEOUT_S,
            max_responses=1 if watch else None,
            deadline_is_ours=watch,  # a job that waits has no next event: our deadline ends the watch
        )
        if method.name == "SubmitJob":
            cancel_accepted(mesh, outcome)

    fuzz.run(case, body, services=[mesh.trainer, mesh.registry])


# -- data sets -------------------------------------------------------------------------------------------------


def npz_of(arrays: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def zip_of(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


@st.composite
def data_sets(draw, mesh) -> tuple[str, bytes]:
    """(format, bytes): a small valid NPZ or CSV, a zip with odd entries, random bytes; then perhaps cut short or
    bit-flipped."""
    x = np.zeros((4, 3), np.float32)
    text = st.text(max_size=40)
    base = draw(
        st.sampled_from(
            (
                ("npz", npz_of({"x": x, "y": np.array([0, 1, 0, 1])})),
                ("npz", npz_of({"features": x})),
                ("csv", b"a,b,label\n0,1,0\n1,0,1\n"),
                ("csv", b"\xef\xbb\xbfa;b;label\r\n"),
                ("csv", b'"unterminated,label\n'),
                ("csv", b"a,\x00,label\n"),
                ("csv", b"\xff\xfe\x00a"),
                ("csv", b""),
                ("tfrecord", b"\x00" * 16),
                ("npz", b""),
                ("npz", zip_of([("x.npy", b"not an array"), ("../y.npy", b""), ("/abs", b"")])),
            )
        )
    )
    fmt, data = base
    how = draw(st.sampled_from(("as is", "as is", "truncate", "flip", "text", "random", "other format")))
    if how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip" and data:
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(data)
    elif how == "text":
        data = ",".join(draw(st.lists(text, max_size=5))).encode("utf-8", "surrogatepass")
    elif how == "random":
        data = draw(st.binary(max_size=128))
    elif how == "other format":
        fmt = draw(st.sampled_from(("csv", "npz", "tfrecord", "CSV", "")))
    return fmt, data


def test_trainer_data_sets(mesh, fuzz, protofuzz):
    """SubmitJob of a spec whose data set is a blob the registry holds: the trainer downloads it and reads its
    columns, whatever it holds."""
    strategies = protofuzz(hints=[*hints(mesh), "x", "y", "features", "a", "b"])
    columns = st.tuples(
        st.lists(strategies.strings, max_size=3), strategies.strings, strategies.strings, strategies.strings
    )
    method = SERVICE.methods_by_name["SubmitJob"]

    def body(value) -> None:
        (fmt, data), (features, label, features_key, label_key), mutate = value
        digest = sha256(data)
        upload = [
            rpb.UploadBlobRequest(metadata=rpb.BlobMetadata(digest=digest, size_bytes=len(data))),
            *([rpb.UploadBlobRequest(chunk=data)] if data else []),
        ]
        try:
            mesh.registry_client.stub.UploadBlob(iter(upload), timeout=30)
        except grpc.RpcError as err:  # stored already (an earlier case)
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
        dataset = pb.Dataset(
            blob_digest=digest,
            format=fmt,
            feature_columns=features,
            label_column=label,
            features_key=features_key,
            label_key=label_key,
        )
        request = pb.SubmitJobRequest(spec=mesh.digits_spec(dataset=dataset))
        if mutate:
            request = mutate
            request.spec.dataset.CopyFrom(dataset)
        outcome = fuzz.call_method(mesh.channel, method, request.SerializeToString(), timeout=TIMEOUT_S)
        cancel_accepted(mesh, outcome)

    spec_mutations = st.one_of(st.none(), strategies.mutated(seeds(mesh)["SubmitJob"][0]))
    fuzz.run(st.tuples(data_sets(mesh), columns, spec_mutations), body, services=[mesh.trainer, mesh.registry])


def test_trainer_stays_healthy(mesh, service_health):
    """Alive and SERVING, the PENDING job still there, and no fuzzed job left waiting."""
    service_health(mesh.trainer, mesh.channel)
    service_health(mesh.registry, mesh.registry_channel)
    assert mesh.stub.GetJob(pb.GetJobRequest(id=mesh.pending), timeout=10).state == pb.JOB_STATE_PENDING
    waiting = mesh.stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_PENDING, page_size=500), timeout=10).jobs
    assert [job.id for job in waiting] == [mesh.pending]
