"""A registry whose blob store fills up: its blob dir is a 4 MiB tmpfs the test mounts (root only). Uploads that do
not fit fail with RESOURCE_EXHAUSTED and leave nothing behind, reads go on, and uploads work again once there is
space."""

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.client.errors import ResourceExhausted
from modelgrid.registry.v1 import registry_pb2 as pb

KiB, MiB = 1024, 1024 * 1024
DISK_BYTES = 4 * MiB


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/blobs as a tmpfs of 4 MiB, unmounted after the test (after the registry using it has stopped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "blobs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES // MiB}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


@pytest.fixture
def registry_on_small_disk(small_disk, consul, redis_server, launch, tmp_path, client_for) -> Iterator[SimpleNamespace]:
    """A registry subprocess whose blob dir is the small tmpfs; stopped before the tmpfs is unmounted."""
    process = launch.registry(consul.http_url, redis_server.url, tmp_path)
    assert Path(process.env["MODELGRID_REGISTRY_BLOB_DIR"]) == small_disk
    channel, client = client_for(process)
    try:
        yield SimpleNamespace(process=process, client=client, channel=channel, blob_dir=small_disk)
    finally:
        channel.close()
        process.stop()


def fill(directory: Path) -> Path:
    """Writes a file into `directory` until its file system is full; returns it."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * (256 * KiB))
                out.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    assert free_bytes(directory) < 4 * KiB
    return filler


def code_and_details(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    cause = exc.__cause__
    assert isinstance(cause, grpc.RpcError), exc
    return cause.code(), cause.details()


def assert_out_of_space(caught: pytest.ExceptionInfo, blob_dir: Path) -> None:
    code, details = code_and_details(caught.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "blob store is out of space" in details and "upload again" in details
    assert str(blob_dir) not in details and "/" not in details, "a server path reached the client"


def test_a_full_blob_store_refuses_uploads_cleanly_keeps_serving_reads_and_recovers(
    registry_on_small_disk, tmp_path, unique
):
    reg = registry_on_small_disk
    client, stub, blob_dir = reg.client, reg.client.stub, reg.blob_dir
    model = unique("diskfull")
    client.ensure_model(model)
    first = tmp_path / "first.bin"
    first.write_bytes(os.urandom(512 * KiB))
    assert client.push_file(model, first).version == 1
    free_before = free_bytes(blob_dir)

    # Larger than the free space: refused, the staged bytes are gone (space back), no version, no INTERNAL.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(DISK_BYTES + MiB))
    with pytest.raises(ResourceExhausted) as caught:
        client.push_file(model, big, timeout=60)
    assert_out_of_space(caught, blob_dir)
    with pytest.raises(ResourceExhausted) as caught:  # data sets and batch results take the same path
        client.upload_blob(big)
    assert_out_of_space(caught, blob_dir)
    assert list((blob_dir / "tmp").iterdir()) == []
    assert free_bytes(blob_dir) >= free_before - 16 * KiB, "the refused upload still holds space"
    assert [v.version for v in stub.ListVersions(pb.ListVersionsRequest(model_name=model)).versions] == [1]
    assert stub.GetModel(pb.GetModelRequest(name=model)).latest_version == 1

    # A full disk: even a tiny upload (buffered, so it fails on flush at commit) is refused the same way.
    filler = fill(blob_dir)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(ResourceExhausted) as caught:
        client.push_file(model, tiny)
    assert_out_of_space(caught, blob_dir)
    assert list((blob_dir / "tmp").iterdir()) == []

    # Reads go on while the disk is full.
    health = health_pb2_grpc.HealthStub(reg.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert model in [m.name for m in stub.ListModels(pb.ListModelsRequest(name_prefix=model)).models]
    version = stub.GetVersion(pb.GetVersionRequest(model_name=model, version=1))
    assert version.artifact.digest == hashlib.sha256(first.read_bytes()).hexdigest()
    downloaded = client.download(f"{model}:1", tmp_path / "first.download")
    assert downloaded.version == 1 and (tmp_path / "first.download").read_bytes() == first.read_bytes()
    assert stub.StatBlob(pb.StatBlobRequest(digest=version.artifact.digest)).size_bytes == 512 * KiB

    # Space freed: uploads work again, with the next number (the refused ones consumed none).
    filler.unlink()
    second = tmp_path / "second.bin"
    second.write_bytes(os.urandom(256 * KiB))
    assert client.push_file(model, second).version == 2
    assert [v.version for v in stub.ListVersions(pb.ListVersionsRequest(model_name=model)).versions] == [2, 1]
    client.download(f"{model}:2", tmp_path / "second.download")
    assert (tmp_path / "second.download").read_bytes() == second.read_bytes()
    assert list((blob_dir / "tmp").iterdir()) == []
    log = reg.process.log_path.read_text()
    assert "unexpected error" not in log and "Traceback" not in log
