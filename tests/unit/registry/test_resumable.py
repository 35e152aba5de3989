"""Transfers that resume: an upload cut short keeps what the registry received and the next upload of the same
digest sends only the rest; a download cut short keeps what arrived and the next one asks only for the rest. Against
a real registry in this process over real channels; the cut is a cancelled call, as a lost connection ends it."""

import asyncio
import hashlib
import os
import time

import grpc
import pytest

from modelgrid.client.errors import DataLoss
from modelgrid.client.registry import RegistryClient
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

KiB = 1024
MiB = 1024 * KiB
PIECE = 256 * KiB


def _blob(tmp_path, size: int) -> tuple[bytes, str, object]:
    data = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return data, hashlib.sha256(data).hexdigest(), path


async def _received(stub, digest: str, at_least: int) -> int:
    """StatUpload's received bytes once the registry has written `at_least` (it writes what it read before it
    notices the cancel)."""
    deadline = time.monotonic() + 10
    while True:
        status = await stub.StatUpload(pb.StatUploadRequest(digest=digest), timeout=5)
        if status.received_bytes >= at_least or time.monotonic() > deadline:
            return status.received_bytes
        await asyncio.sleep(0.05)


async def _cut_upload(stub, digest: str, size: int, data: bytes, pieces: int, offset: int = 0) -> None:
    """Sends the metadata and `pieces` chunks from `offset`, then cancels the call mid-stream."""
    sent = asyncio.Event()

    async def messages():
        yield pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=size, offset=offset))
        for i in range(pieces):
            yield pb.UploadBlobRequest(chunk=data[offset + i * PIECE : offset + (i + 1) * PIECE])
        sent.set()
        await asyncio.Event().wait()  # the stream stays open until the call is cancelled

    call = stub.UploadBlob(messages(), timeout=30)
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_an_upload_cut_short_resumes_where_the_registry_got_to(registry, tmp_path):
    data, digest, path = _blob(tmp_path, 3 * MiB)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        before = await stub.StatUpload(pb.StatUploadRequest(digest=digest), timeout=5)
        assert (before.stored, before.received_bytes) == (False, 0)

        await _cut_upload(stub, digest, len(data), data, pieces=4)
        held = await _received(stub, digest, 4 * PIECE)
        assert held == 4 * PIECE, "the registry dropped the bytes of the cut upload"

        # The blocking client (the CLI's) asks where to start and sends only the rest.
        progress: list[int] = []
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as sync_channel:
            client = RegistryClient(sync_channel, chunk_bytes=PIECE)
            blob = await asyncio.to_thread(client.upload_blob, path, progress=lambda done, total: progress.append(done))
        assert (blob.digest, blob.size_bytes) == (digest, len(data))
        assert progress[:2] == [held, held + PIECE] and progress[-1] == len(data), progress

        after = await stub.StatUpload(pb.StatUploadRequest(digest=digest), timeout=5)
        assert (after.stored, after.received_bytes) == (True, len(data))
        copy = tmp_path / "copy.bin"
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as sync_channel:
            await asyncio.to_thread(RegistryClient(sync_channel).download_blob, digest, copy)
        assert copy.read_bytes() == data
        assert not list((registry_blob_dir(registry) / "uploads").iterdir()), "the resumed upload left its bytes"


async def test_the_async_client_resumes_too_and_a_resume_may_go_back_but_not_past_what_is_held(
    registry, registry_client, tmp_path
):
    data, digest, path = _blob(tmp_path, 2 * MiB)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        await _cut_upload(stub, digest, len(data), data, pieces=3)
        held = await _received(stub, digest, 3 * PIECE)

        # Past what is held: FAILED_PRECONDITION, and what is held stays.
        past = [pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=len(data), offset=held + 1))]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadBlob(iter(past), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "StatUpload" in err.value.details()
        assert await _received(stub, digest, held) == held

        # Back to an earlier offset: the bytes after it are dropped and received again.
        await _cut_upload(stub, digest, len(data), data, pieces=1, offset=PIECE)
        assert await _received(stub, digest, 2 * PIECE) == 2 * PIECE

        blob = await registry_client.upload_blob(path)
        assert blob.digest == digest and blob.size_bytes == len(data)
        assert (await registry_client.stat_blob(digest)).size_bytes == len(data)
        assert (await registry_client.upload_blob(path)).digest == digest  # stored: nothing is sent again


async def test_one_upload_of_a_digest_at_a_time(registry, tmp_path):
    data, digest, _ = _blob(tmp_path, 1 * MiB)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        opened = asyncio.Event()

        async def slow():
            yield pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=len(data)))
            yield pb.UploadBlobRequest(chunk=data[:PIECE])
            opened.set()
            await asyncio.sleep(1.0)
            yield pb.UploadBlobRequest(chunk=data[PIECE:])

        first = stub.UploadBlob(slow(), timeout=30)
        await asyncio.wait_for(opened.wait(), 10)
        await _received(stub, digest, PIECE)
        second = [
            pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=len(data))),
            pb.UploadBlobRequest(chunk=data),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadBlob(iter(second), timeout=10)
        assert err.value.code() == grpc.StatusCode.ABORTED and "in progress" in err.value.details()
        assert (await first).digest == digest  # the first one was not disturbed


async def test_a_download_cut_short_resumes_from_what_the_file_holds(registry_client, tmp_path):
    data, _, path = _blob(tmp_path, 3 * MiB)
    blob = await registry_client.upload_blob(path)

    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[: MiB + 5])
    got = await registry_client.download_blob(blob.digest, partial)
    assert got.offset == MiB + 5, "the download did not start where the file ended"
    assert partial.read_bytes() == data

    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"x" * 1000)
    with pytest.raises(DataLoss):
        await registry_client.download_blob(blob.digest, corrupt)
    assert not corrupt.exists(), "bytes that are not the blob's were kept"

    too_long = tmp_path / "too-long.bin"
    too_long.write_bytes(data + b"tail")
    got = await registry_client.download_blob(blob.digest, too_long)
    assert got.offset == 0 and too_long.read_bytes() == data


def registry_blob_dir(registry):
    """The in-process registry's blob directory (its settings)."""
    return registry.settings.blob_dir
