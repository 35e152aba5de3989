"""The S3 blob backend against a real S3-compatible server (moto's, a separate process on a free loopback port):
writes, verification, reads, multipart uploads, resumable uploads, and the errors of a store that is down, refuses
access or lacks its bucket."""

import hashlib
import io
import os
import tarfile
import threading
import uuid

import pytest
from botocore.exceptions import ResponseStreamingError
from botocore.stub import Stubber
from pydantic import ValidationError

from modelgrid.client.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.kit.s3local import SECRET_ACCESS_KEY, S3Server
from services.registry.blobstore import BlobStoreConfigError, open_blob_store
from services.registry.blobstore_s3 import S3BlobStore
from services.registry.settings import RegistrySettings

MiB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """The test credentials in the standard variables boto3 reads, and nothing from this machine's ~/.aws."""
    for name, value in S3Server.credentials_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture()
def bucket(s3) -> str:
    name = f"blobs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


def make_store(s3, bucket, tmp_path, name="staging", **options) -> S3BlobStore:
    options = {"endpoint_url": s3.endpoint_url, "region": "us-east-1", "max_attempts": 2, **options}
    return S3BlobStore(bucket, tmp_path / name, **options)


@pytest.fixture()
def store(s3, bucket, tmp_path) -> S3BlobStore:
    return make_store(s3, bucket, tmp_path)


def put(store: S3BlobStore, data: bytes) -> str:
    writer = store.writer(1 << 40)
    for start in range(0, len(data), 64 * 1024):
        writer.write(data[start : start + 64 * 1024])
    return writer.commit(hashlib.sha256(data).hexdigest())


def staged(store: S3BlobStore) -> list[str]:
    return [p.name for p in store.tmp_dir.iterdir()] + [p.name for p in store.uploads_dir.iterdir()]


def count_puts(store: S3BlobStore) -> list[str]:
    calls: list[str] = []
    for operation in ("PutObject", "CreateMultipartUpload"):
        store._client.meta.events.register(f"before-call.s3.{operation}", lambda **kw: calls.append(kw["model"].name))
    return calls


def test_commit_stores_the_blob_under_prefix_sha256_digest(s3, bucket, store):
    data = os.urandom(300 * 1024)
    digest = put(store, data)

    assert digest == hashlib.sha256(data).hexdigest()
    head = s3.client().head_object(Bucket=bucket, Key=f"modelgrid/blobs/sha256/{digest}")
    assert head["ContentLength"] == len(data)
    assert store.exists(digest) and store.size(digest) == len(data)
    assert b"".join(store.read(digest, 0, 64 * 1024)) == data
    assert staged(store) == []  # the staged file went once the bytes were in the bucket


def test_a_digest_mismatch_stores_nothing(s3, bucket, store):
    data = os.urandom(10_000)
    writer = store.writer(1 << 20)
    writer.write(data)
    wrong = hashlib.sha256(b"other bytes").hexdigest()

    with pytest.raises(InvalidArgument, match="digest mismatch"):
        writer.commit(wrong)

    assert s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert not store.exists(hashlib.sha256(data).hexdigest())
    assert staged(store) == []


def test_ranged_reads_and_missing_blobs(store):
    data = os.urandom(2 * MiB + 123)
    digest = put(store, data)

    chunks = list(store.read(digest, 1_000_000, 256 * 1024))
    assert b"".join(chunks) == data[1_000_000:]
    assert all(len(c) <= 256 * 1024 for c in chunks) and len(chunks) > 1
    assert list(store.read(digest, len(data), 1024)) == []  # from the very end: nothing

    absent = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(absent)
    with pytest.raises(DataLoss, match="missing from the blob store"):  # as the local backend: recorded but gone
        store.size(absent)
    with pytest.raises(NotFound):
        list(store.read(absent, 0, 1024))
    with pytest.raises(NotFound):
        store.open(absent)


class BreakingBody:
    """A real response body whose stream breaks after its first chunk, as a dropped connection does."""

    def __init__(self, body) -> None:
        self._body = body

    def iter_chunks(self, chunk_size):
        chunks = self._body.iter_chunks(chunk_size)
        yield next(chunks)
        raise ResponseStreamingError(error="connection reset by peer")

    def close(self) -> None:
        self._body.close()


def test_a_read_that_breaks_continues_from_where_it_was(store, monkeypatch):
    data = os.urandom(700_000)
    digest = put(store, data)
    real_get = store._client.get_object
    ranges: list[str] = []

    def get_object(**kwargs):
        ranges.append(kwargs.get("Range", ""))
        reply = real_get(**kwargs)
        if len(ranges) == 1:
            reply["Body"] = BreakingBody(reply["Body"])
        return reply

    monkeypatch.setattr(store._client, "get_object", get_object)
    assert b"".join(store.read(digest, 100, 64 * 1024)) == data[100:]
    assert ranges == ["bytes=100-", f"bytes={100 + 64 * 1024}-"]

    def always_breaking(**kwargs):
        ranges.append(kwargs.get("Range", ""))
        reply = real_get(**kwargs)
        reply["Body"] = BreakingBody(reply["Body"])
        return reply

    ranges.clear()  # breaking on every attempt: Unavailable after max_attempts (2)
    monkeypatch.setattr(store._client, "get_object", always_breaking)
    with pytest.raises(Unavailable):
        list(store.read(digest, 0, 64 * 1024))
    assert len(ranges) == 2


def test_open_is_a_seekable_file_that_tarfile_can_read(store, tmp_path):
    members = {"saved_model.pb": os.urandom(5000), "variables/variables.data-00000-of-00001": os.urandom(700_000)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    digest = put(store, data)

    with store.open(digest) as blob:
        blob.seek(-100, io.SEEK_END)
        assert blob.read() == data[-100:]
        blob.seek(0)
        with tarfile.open(fileobj=blob, mode="r:") as tar:
            assert tar.extractfile("saved_model.pb").read() == members["saved_model.pb"]


def test_the_same_blob_is_uploaded_once_and_two_registries_may_commit_it_together(s3, bucket, tmp_path):
    first, second = make_store(s3, bucket, tmp_path, "a"), make_store(s3, bucket, tmp_path, "b")
    data = os.urandom(200_000)
    digest = put(first, data)

    puts = count_puts(second)
    assert put(second, data) == digest
    assert puts == []  # already in the bucket: not sent again

    more = os.urandom(6 * MiB)  # two registries committing the same new digest at the same moment
    results, errors = [], []

    def commit(store):
        try:
            results.append(put(store, more))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(s,)) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [hashlib.sha256(more).hexdigest()] * 2
    assert b"".join(second.read(results[0], 0, MiB)) == more


def test_a_large_blob_goes_up_in_parts(s3, bucket, tmp_path):
    store = make_store(s3, bucket, tmp_path, multipart_threshold=5 * MiB, multipart_chunk=5 * MiB)
    data = os.urandom(12 * MiB + 7)
    puts = count_puts(store)

    digest = put(store, data)

    assert puts == ["CreateMultipartUpload"]
    etag = s3.client().head_object(Bucket=bucket, Key=store.key(digest))["ETag"]
    assert etag.strip('"').endswith("-3")  # an S3 multipart ETag: <md5 of the parts' md5s>-<parts>
    assert hashlib.sha256(b"".join(store.read(digest, 0, MiB))).hexdigest() == digest


def test_a_resumed_upload_continues_from_the_staged_bytes(store):
    data = os.urandom(500_000)
    digest = hashlib.sha256(data).hexdigest()
    writer = store.resumable_writer(digest, 0, 1 << 30)
    writer.write(data[:200_000])
    writer.suspend()
    assert store.received(digest) == 200_000 and not store.exists(digest)

    writer = store.resumable_writer(digest, 150_000, 1 << 30)
    writer.write(data[150_000:])
    assert writer.commit(digest) == digest

    assert store.received(digest) == 0
    assert b"".join(store.read(digest, 0, 1 << 20)) == data
    assert staged(store) == []


def test_a_store_that_is_down_is_unavailable_and_the_upload_is_dropped(tmp_path):
    with S3Server(tmp_path / "s3-down") as server:
        server.create_bucket("going-away")
        store = make_store(server, "going-away", tmp_path, max_attempts=1, connect_timeout=1, read_timeout=2)
        data = os.urandom(50_000)
        digest = put(store, data)
    # the server is stopped now
    with pytest.raises(Unavailable) as caught:
        store.exists(digest)
    message = str(caught.value)
    assert "blob store (S3) is unreachable" in message and "retry" in message
    assert SECRET_ACCESS_KEY not in message and "127.0.0.1" not in message
    with pytest.raises(Unavailable):
        list(store.read(digest, 0, 1024))

    writer = store.writer(1 << 20)
    writer.write(b"more bytes")
    with pytest.raises(Unavailable):
        writer.commit(hashlib.sha256(b"more bytes").hexdigest())
    assert staged(store) == []


def test_refused_access_is_a_clear_failed_precondition(store):
    digest = hashlib.sha256(b"x").hexdigest()
    with Stubber(store._client) as stub:
        stub.add_client_error("head_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(FailedPrecondition, match="denied it access.*credentials"):
            store.exists(digest)
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        with pytest.raises(BlobStoreConfigError, match="access is denied") as caught:
            store.check()
    assert SECRET_ACCESS_KEY not in str(caught.value)


def test_an_upload_refused_by_the_store_is_a_failed_precondition_and_nothing_stays(store):
    data = b"refused bytes"
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer(1 << 20)
    writer.write(data)
    with Stubber(store._client) as stub:
        stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
        stub.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(FailedPrecondition, match="denied it access"):
            writer.commit(digest)
        stub.assert_no_pending_responses()
    assert staged(store) == []


def test_check_names_a_missing_bucket_and_an_unreachable_endpoint(s3, tmp_path):
    with pytest.raises(BlobStoreConfigError) as caught:
        make_store(s3, "no-such-bucket-here", tmp_path).check()
    message = str(caught.value)
    assert "'no-such-bucket-here'" in message and s3.endpoint_url in message and "does not exist" in message
    assert SECRET_ACCESS_KEY not in message

    closed = S3Server(tmp_path / "never-started")  # a free port nobody listens on
    with pytest.raises(BlobStoreConfigError, match="unreachable") as caught:
        make_store(closed, "any-bucket", tmp_path, max_attempts=1, connect_timeout=1).check()
    assert closed.endpoint_url in str(caught.value)


def test_the_settings_pick_the_backend(s3, bucket, tmp_path):
    with pytest.raises(ValidationError, match="S3_BUCKET"):
        RegistrySettings(blob_backend="s3", blob_dir=tmp_path / "x")

    settings = RegistrySettings(
        blob_backend="s3",
        blob_dir=tmp_path / "staging",
        s3_bucket=bucket,
        s3_endpoint_url=s3.endpoint_url,
        s3_prefix="team/blobs",
    )
    store = open_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    digest = put(store, b"hello")
    assert s3.client().head_object(Bucket=bucket, Key=f"team/blobs/sha256/{digest}")["ContentLength"] == 5

    missing = settings.model_copy(update={"s3_bucket": "not-there-at-all"})
    with pytest.raises(BlobStoreConfigError, match="'not-there-at-all'"):
        open_blob_store(missing)
