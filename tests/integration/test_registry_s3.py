"""Registries with the S3 blob backend as real processes, against a real S3-compatible server (moto's, on a free
loopback port): two registries sharing one Redis and one bucket serve the same versions, also once the one that
received them is gone; a store that goes down makes downloads UNAVAILABLE; a missing bucket stops a registry at
start with a message naming it."""

import hashlib
import io
import os
import tarfile
import uuid
from pathlib import Path

import grpc
import pytest

from modelgrid.client.errors import Unavailable
from modelgrid.client.registry import ArtifactFormat
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.savedmodel.v1 import savedmodel_pb2 as smpb
from services.kit.s3local import SECRET_ACCESS_KEY, S3Server

pytestmark = pytest.mark.slow

MiB = 1 << 20


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def savedmodel_tar(path: Path) -> Path:
    """A SavedModel tar with one serving signature (x: float32 [-1, 4]) and a few MiB of variables."""
    shape = smpb.TensorShapeProto(dim=[smpb.TensorShapeProto.Dim(size=-1), smpb.TensorShapeProto.Dim(size=4)])
    signature = smpb.SignatureDef(
        inputs={"x": smpb.TensorInfo(name="serve_x:0", dtype=1, tensor_shape=shape)},
        outputs={"y": smpb.TensorInfo(name="out:0", dtype=1, tensor_shape=shape)},
        method_name="tensorflow/serving/predict",
    )
    serve = smpb.MetaInfoDef(tags=["serve"])
    graph = smpb.MetaGraphDef(meta_info_def=serve, signature_def={"serving_default": signature})
    members = {
        "variables/variables.data-00000-of-00001": os.urandom(3 * MiB),  # first: the signature is read past it
        "saved_model.pb": smpb.SavedModel(meta_graphs=[graph]).SerializeToString(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def s3_settings(server: S3Server, bucket: str, **more: str) -> dict[str, str]:
    return {
        "BLOB_BACKEND": "s3",
        "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": server.endpoint_url,
        "S3_REGION": "us-east-1",
        "S3_MULTIPART_THRESHOLD_BYTES": str(5 * MiB),
        "S3_MULTIPART_CHUNK_BYTES": str(5 * MiB),
        **more,
    }


def staged_blobs(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]


def test_two_registries_share_one_redis_and_one_bucket(
    consul, redis_server, s3_server, launch, client_for, unique, tmp_path
):
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    shared = s3_settings(s3_server, bucket, REDIS_KEY_PREFIX=f"mg:test:{uuid.uuid4().hex[:8]}:")
    with launch.together():  # two hosts' registries: each its own staging dir, the same Redis and bucket
        a = launch.registry(consul.http_url, redis_server.url, tmp_path / "a", **shared)
        b = launch.registry(consul.http_url, redis_server.url, tmp_path / "b", **shared)
    channel_a, client_a = client_for(a)
    channel_b, client_b = client_for(b)
    try:
        name = unique("s3")
        client_a.ensure_model(name)
        tar = savedmodel_tar(tmp_path / "model.tar")
        pushed = client_a.push_file(name, tar, artifact_format=ArtifactFormat.SAVEDMODEL_TAR)
        digest = sha256_file(tar)
        assert pushed.artifact.digest == digest and pushed.artifact.size_bytes == tar.stat().st_size
        assert [s.name for s in pushed.signatures] == ["serving_default"]  # read from the bucket (open)
        raw = tmp_path / "raw.bin"
        raw.write_bytes(os.urandom(11 * MiB + 5))  # in three parts (5 MiB threshold and parts)
        second = client_a.push_file(name, raw)

        key = f"modelgrid/blobs/sha256/{digest}"
        assert s3_server.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == tar.stat().st_size
        assert staged_blobs(tmp_path / "a") == []  # nothing stays on A's disk

        resolved = client_b.resolve(f"{name}:1")
        assert resolved.artifact.digest == digest and [s.name for s in resolved.signatures] == ["serving_default"]
        got = client_b.download(f"{name}:1", tmp_path / "from-b.tar")  # the client checks the digest too
        assert got.artifact.digest == digest and sha256_file(tmp_path / "from-b.tar") == digest
        client_b.download(f"{name}:{second.version}", tmp_path / "raw-from-b.bin")
        assert sha256_file(tmp_path / "raw-from-b.bin") == sha256_file(raw)

        # A version created on B from a blob uploaded through A: B inspects it in the bucket.
        blob = client_a.upload_blob(tar)
        meta = pb.VersionMetadata(
            model_name=name,
            artifact_digest=blob.digest,
            artifact_size=blob.size_bytes,
            artifact_format=pb.ARTIFACT_FORMAT_SAVEDMODEL_TAR,
            from_blob=True,
        )
        adopted = client_b.stub.CreateVersion(iter([pb.CreateVersionRequest(metadata=meta)]), timeout=30)
        assert adopted.artifact.digest == digest and [s.name for s in adopted.signatures] == ["serving_default"]

        a.stop()  # SIGTERM to A's pid; B alone serves what A received
        assert not a.running()
        client_b.download(f"{name}:1", tmp_path / "again-from-b.tar")
        assert sha256_file(tmp_path / "again-from-b.tar") == digest
        client_b.download_blob(sha256_file(raw), tmp_path / "blob-from-b.bin")
        assert sha256_file(tmp_path / "blob-from-b.bin") == sha256_file(raw)
        assert staged_blobs(tmp_path / "b") == []  # B served it all from the bucket
    finally:
        channel_a.close()
        channel_b.close()


def test_a_store_that_goes_down_makes_downloads_unavailable(
    consul, redis_server, s3_server, launch, client_for, unique, tmp_path
):
    own = S3Server(tmp_path / "s3")  # started and stopped here: the module's server stays up
    own.start()
    try:
        own.create_bucket("short-lived")
        registry = launch.registry(
            consul.http_url,
            redis_server.url,
            tmp_path,
            **s3_settings(own, "short-lived", S3_MAX_ATTEMPTS="1", S3_CONNECT_TIMEOUT_SECONDS="1"),
        )
        channel, client = client_for(registry)
        name = unique("s3down")
        client.ensure_model(name)
        data = tmp_path / "data.bin"
        data.write_bytes(os.urandom(100_000))
        client.push_file(name, data)
    finally:
        own.stop()
    try:
        assert client.resolve(name).version == 1  # Redis still answers
        with pytest.raises(Unavailable):
            client.download(name, tmp_path / "out.bin")
        with pytest.raises(grpc.RpcError) as raw_error:  # the registry's own status and message
            client.stub.StatBlob(pb.StatBlobRequest(digest=sha256_file(data)), timeout=10)
        assert raw_error.value.code() == grpc.StatusCode.UNAVAILABLE
        message = raw_error.value.details()
        assert "blob store (S3) is unreachable" in message and "retry" in message
        assert SECRET_ACCESS_KEY not in message and own.endpoint_url not in message
    finally:
        channel.close()
        registry.stop()
    assert SECRET_ACCESS_KEY not in registry.log_path.read_text()  # nor in the log


def test_a_missing_bucket_stops_the_registry_at_start(consul, redis_server, s3_server, launch, tmp_path):
    with pytest.raises(TimeoutError) as caught:
        launch.registry(consul.http_url, redis_server.url, tmp_path, **s3_settings(s3_server, "no-such-bucket"))
    log = (tmp_path / "registry.log").read_text()
    expected = f"S3 bucket 'no-such-bucket' at {s3_server.endpoint_url}: the bucket does not exist"
    assert expected in log and expected in str(caught.value)
    assert SECRET_ACCESS_KEY not in log
    process = launch.started[-1]
    assert not process.running() and process.process.returncode != 0
