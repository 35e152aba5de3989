"""Crash safety of the registry: kill -9 mid-upload, and a Redis restart, with their own Redis server."""

import hashlib
import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from modelgrid.registry.v1 import registry_pb2 as pb
from services.kit.localinfra import RedisServer

MiB = 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("crash-redis")) as server:
        yield server


def test_kill_9_mid_upload_leaves_no_partial_version_and_no_temp_files(
    consul, own_redis, tmp_path, launch, client_for, unique
):
    process = launch.registry(consul.http_url, own_redis.url, tmp_path)
    blob_dir = Path(process.env["MODELGRID_REGISTRY_BLOB_DIR"])
    model = unique("crash")
    channel, client = client_for(process)
    client.ensure_model(model)

    data = os.urandom(4 * MiB)
    release = threading.Event()

    def stalled_upload():
        meta = pb.VersionMetadata(model_name=model, artifact_digest=sha256_hex(data), artifact_size=len(data))
        yield pb.CreateVersionRequest(metadata=meta)
        yield pb.CreateVersionRequest(chunk=data[:MiB])
        release.wait(30)  # the registry is killed while it waits for the rest

    upload = client.stub.CreateVersion.future(stalled_upload())
    deadline = time.monotonic() + 10
    while not any(p.stat().st_size >= MiB for p in (blob_dir / "tmp").iterdir()):
        assert time.monotonic() < deadline, "the upload never reached the registry's staging area"
        time.sleep(0.05)
    process.kill()
    release.set()
    assert upload.exception(timeout=10).code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    assert list((blob_dir / "tmp").iterdir()), "the killed process left its staged upload (as a crash would)"

    restarted = launch.registry(
        consul.http_url,
        own_redis.url,
        tmp_path,
        PORT=str(process.port),
        REDIS_KEY_PREFIX=process.env["MODELGRID_REGISTRY_REDIS_KEY_PREFIX"],
    )
    try:
        channel, client = client_for(restarted)
        assert list((blob_dir / "tmp").iterdir()) == []
        assert client.stub.GetModel(pb.GetModelRequest(name=model)).latest_version == 0
        assert list(client.stub.ListVersions(pb.ListVersionsRequest(model_name=model)).versions) == []
        path = tmp_path / "next"
        path.write_bytes(data)
        assert client.push_file(model, path).version == 1

        # Restart Redis (AOF on): every piece of metadata is still there and the registry reconnects by itself.
        client.stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="production", version=1))
        before = client.stub.GetModel(pb.GetModelRequest(name=model))
        own_redis.restart()
        after = client.stub.GetModel(pb.GetModelRequest(name=model))
        assert after == before
        assert client.stub.GetVersion(pb.GetVersionRequest(model_name=model, version=1)).artifact.digest == (
            sha256_hex(data)
        )
        assert len(client.stub.GetHistory(pb.GetHistoryRequest(model_name=model)).events) == 3
        channel.close()
    finally:
        restarted.stop()
