"""The local blob store when the disk or a quota runs out on the steps a small tmpfs cannot make fail (fsync,
rename; tests/integration/test_registry_disk_full.py fills a real one): ResourceExhausted without a server path,
and nothing left behind."""

import errno
import hashlib
import os

import pytest

from services.kit.errors import ResourceExhausted
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
