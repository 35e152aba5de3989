"""The local blob store when the disk or a quota runs out on the steps a small tmpfs cannot make fail (fsync,
rename; tests/integration/test_registry_disk_full.py fills a real one): ResourceExhausted without a server path,
and nothing left behind; and uploads by digest kept for a bounded time when they are cut short."""

import errno
import hashlib
import os
import time

import pytest

from modelgrid.client.errors import Aborted, FailedPrecondition, ResourceExhausted
from services.registry.blobstore import LocalBlobStore


@pytest.mark.parametrize(
    ("step", "code", "reason"),
    [
        ("fsync", errno.ENOSPC, "the disk is full"),
        ("replace", errno.ENOSPC, "the disk is full"),
        ("replace", errno.EDQUOT, "quota is exceeded"),
        ("fsync", errno.EDQUOT, "quota is exceeded"),
    ],
)
def test_out_of_space_on_any_step_aborts_the_upload(tmp_path, monkeypatch, step, code, reason):
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(64 * 1024)
    writer = store.writer(1 << 20)

    def no_space(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "blobs" / "tmp" / "x.part"))

    writer.write(data)
    monkeypatch.setattr(os, step, no_space)
    with pytest.raises(ResourceExhausted) as caught:
        writer.commit(hashlib.sha256(data).hexdigest())
    monkeypatch.undo()

    message = str(caught.value)
    assert "blob store is out of space" in message and reason in message
    assert str(tmp_path) not in message
    assert list(store.tmp_dir.iterdir()) == []
    assert not store.exists(hashlib.sha256(data).hexdigest())
    writer.abort()  # a second abort (the core's) is harmless

    # The next upload works.
    again = store.writer(1 << 20)
    again.write(data)
    assert store.exists(again.commit(hashlib.sha256(data).hexdigest()))


def test_other_os_errors_are_not_mistaken_for_a_full_disk(tmp_path, monkeypatch):
    store = LocalBlobStore(tmp_path / "blobs")
    writer = store.writer(1 << 20)
    writer.write(b"abc")

    def io_error(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError) as caught:
        writer.commit(hashlib.sha256(b"abc").hexdigest())
    assert not isinstance(caught.value, ResourceExhausted) and caught.value.errno == errno.EIO
    monkeypatch.undo()
    writer.abort()
    assert list(store.tmp_dir.iterdir()) == []


KiB = 1024
MiB = 1024 * KiB
PIECE = 256 * KiB


def test_the_store_keeps_cut_uploads_for_a_bounded_time(tmp_path):
    data = os.urandom(3 * PIECE)
    digest = hashlib.sha256(data).hexdigest()
    store = LocalBlobStore(tmp_path / "blobs", resume_ttl_seconds=3600)
    writer = store.resumable_writer(digest, 0, 10 * MiB)
    writer.write(data[:PIECE])
    with pytest.raises(Aborted):
        store.resumable_writer(digest, 0, 10 * MiB)
    writer.suspend()
    with pytest.raises(FailedPrecondition):
        store.resumable_writer(digest, PIECE + 1, 10 * MiB)

    reopened = LocalBlobStore(tmp_path / "blobs", resume_ttl_seconds=3600)  # a restarted registry keeps it
    assert reopened.received(digest) == PIECE
    resumed = reopened.resumable_writer(digest, PIECE, 10 * MiB)
    resumed.write(data[PIECE:])
    assert resumed.commit(digest) == digest and reopened.exists(digest) and reopened.received(digest) == 0

    other = os.urandom(PIECE)
    other_digest = hashlib.sha256(other).hexdigest()
    writer = reopened.resumable_writer(other_digest, 0, 10 * MiB)
    writer.write(other[:KiB])
    writer.suspend()
    old = time.time() - 7200
    os.utime(reopened.upload_path(other_digest), (old, old))
    assert reopened.sweep_uploads() == 1 and reopened.received(other_digest) == 0
