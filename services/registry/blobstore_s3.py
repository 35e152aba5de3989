"""The blob store in one bucket of an S3-compatible store (AWS S3, MinIO, Ceph RGW, ...), through boto3.

A blob is the object `<prefix>/sha256/<digest>`. Registries on different hosts that share one Redis and one bucket
serve the same versions: Redis says which versions exist, the bucket holds their bytes.

Writes: an upload is staged in a local file while it is hashed (as in the local backend, under the staging
directory blob_dir), its digest verified on commit, then uploaded with boto3's managed transfer (in parts, several
at once, from `multipart_threshold` bytes on) and the staged file dropped. A blob already in the bucket is not
uploaded again; as blobs are named by their content, two registries committing the same digest at once write the
same bytes, which is harmless. Resumable uploads (UploadBlob from an offset) keep the bytes of an upload cut short
in that registry instance's staging directory: a resumed upload must reach the same instance; any other one says
it holds 0 bytes of it (StatUpload), and the client sends it again from the start.

Reads: exists and size are HEAD requests, read streams a ranged GET in chunks (continuing from where it was when
the connection breaks, up to `max_attempts` times), open returns a seekable file that reads by ranged GETs.

The credentials need s3:ListBucket on the bucket (without it S3 answers a missing object with 403, not 404),
s3:GetObject and s3:PutObject (and s3:AbortMultipartUpload) on the prefix. A registry killed in the middle of a
multipart upload leaves its parts behind: a lifecycle rule AbortIncompleteMultipartUpload on the bucket removes them.

Errors: a store unreachable after boto3's retries is Unavailable (UNAVAILABLE: retry); refused access, missing
credentials or a missing bucket is FailedPrecondition (the registry's operator must act); an object missing for a
digest is DataLoss from `size` (the local backend's answer for a blob recorded but gone) and NotFound from `read`
and `open`. Messages to clients name neither the endpoint nor any credential; the log has the endpoint and bucket.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from modelgrid.client.artifacts import check_digest
from modelgrid.client.errors import DataLoss, FailedPrecondition, ModelgridError, NotFound, Unavailable
from services.registry.blobstore import BlobStore, BlobStoreConfigError, LocalBlobStore, LocalBlobWriter

if TYPE_CHECKING:
    from services.registry.settings import RegistrySettings

logger = logging.getLogger(__name__)

MiB = 1 << 20
OPEN_BUFFER_BYTES = 256 * 1024
"""Read-ahead of `open()`'s file: each refill is one ranged GET."""
TRANSFER_CONCURRENCY = 4
"""Parts of one multipart upload sent at once."""

UNREACHABLE = "the registry's blob store (S3) is unreachable; retry in a few seconds"
_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_CREDENTIALS_HINT = (
    "boto3 reads AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_PROFILE with "
    "~/.aws/credentials, or an instance role"
)


def redacted_endpoint(url: str) -> str:
    """The endpoint URL without any user:password part, or a description of AWS's default endpoint."""
    if not url:
        return "AWS S3 (boto3's default endpoint)"
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3BlobWriter(LocalBlobWriter):
    """Stages and hashes like the local writer; commit uploads the verified bytes to the bucket."""

    def __init__(self, store: S3BlobStore, max_bytes: int, resume: tuple[str, int] | None = None) -> None:
        super().__init__(store.staging, max_bytes, resume)
        self._s3 = store

    def commit(self, expected_digest: str) -> str:
        digest = self._verify(expected_digest)
        try:
            with self._space_errors():
                self._file.flush()
            self._s3.put(digest, self._path, self.size)
        except BaseException:
            self.abort()
            raise
        self._path.unlink(missing_ok=True)  # before close: a resumable upload's lock is held until its file is gone
        self._file.close()
        return digest


class S3BlobStore(BlobStore):
    """Blobs in one bucket of an S3-compatible store; uploads staged under `staging_dir` (see the module doc)."""

    def __init__(
        self,
        bucket: str,
        staging_dir: str | Path,
        *,
        prefix: str = "modelgrid/blobs",
        endpoint_url: str = "",
        region: str = "",
        addressing_style: str = "auto",
        ca_file: str | Path | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        multipart_threshold: int = 64 * MiB,
        multipart_chunk: int = 16 * MiB,
        resume_ttl_seconds: float = 24 * 3600,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = redacted_endpoint(endpoint_url)
        self.max_attempts = max_attempts
        self.staging = LocalBlobStore(staging_dir, resume_ttl_seconds)
        # What the registry's gauges read (metrics.blob_gauges): the staging directory.
        self.root, self.tmp_dir, self.uploads_dir = self.staging.root, self.staging.tmp_dir, self.staging.uploads_dir
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing_style},
            max_pool_connections=max(10, 2 * TRANSFER_CONCURRENCY),
        )
        for name in ("botocore", "boto3", "s3transfer", "urllib3"):  # their DEBUG lines carry signed request headers
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.INFO)
        # One client, made here: boto3's sessions are not thread-safe, its clients are.
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            verify=str(ca_file) if ca_file else True,
            config=config,
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunk,
            max_concurrency=TRANSFER_CONCURRENCY,
            use_threads=True,
        )

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> S3BlobStore:
        return cls(
            settings.s3_bucket.strip(),
            settings.blob_dir,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            ca_file=settings.s3_ca_file,
            connect_timeout=settings.s3_connect_timeout_seconds,
            read_timeout=settings.s3_read_timeout_seconds,
            max_attempts=settings.s3_max_attempts,
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunk=settings.s3_multipart_chunk_bytes,
            resume_ttl_seconds=settings.upload_resume_ttl_seconds,
        )

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint!r})"

    def key(self, digest: str) -> str:
        """The object key of a blob."""
        return f"{self.prefix}/sha256/{digest}" if self.prefix else f"sha256/{digest}"

    # -- start -------------------------------------------------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and answers with these credentials (HEAD bucket); else BlobStoreConfigError."""
        where = f"S3 bucket {self.bucket!r} at {self.endpoint}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                reason = "the bucket does not exist: create it, or name an existing one in MODELGRID_REGISTRY_S3_BUCKET"
            elif status == 403 or code in _DENIED_CODES:
                reason = (
                    f"access is denied: check the registry's credentials ({_CREDENTIALS_HINT}) and the bucket policy"
                )
            else:
                reason = f"the store answered {code or status}"
            raise BlobStoreConfigError(f"the registry cannot use its blob store, {where}: {reason}") from None
        except _CREDENTIAL_ERRORS as exc:
            raise BlobStoreConfigError(
                f"the registry cannot use its blob store, {where}: no usable credentials ({type(exc).__name__}); "
                f"{_CREDENTIALS_HINT}"
            ) from None
        except BotoCoreError as exc:
            raise BlobStoreConfigError(
                f"the registry cannot use its blob store, {where}: the endpoint is unreachable after "
                f"{self.max_attempts} attempts ({type(exc).__name__}); check MODELGRID_REGISTRY_S3_ENDPOINT_URL, "
                "the network and, for TLS, MODELGRID_REGISTRY_S3_CA_FILE"
            ) from None
        logger.info("blob store: %s, prefix %r", where, self.prefix)

    # -- errors ------------------------------------------------------------------------------------------------

    @contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        """boto3's errors in the block as the domain errors services map to gRPC codes (see the module doc)."""
        try:
            yield
        except ModelgridError:
            raise
        except S3UploadFailedError as exc:  # boto3's managed transfer wraps the ClientError it caught
            cause = exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, action) from None
            raise self._unreachable(action, exc) from None
        except ClientError as exc:
            raise self._client_error(exc, action) from None
        except _CREDENTIAL_ERRORS as exc:
            logger.error("blob store: %s: no usable S3 credentials (%s)", action, type(exc).__name__)
            raise FailedPrecondition(
                "the registry has no usable credentials for its blob store (S3); its operator must give it some"
            ) from None
        except (BotoConnectionError, HTTPClientError, BotoCoreError) as exc:
            raise self._unreachable(action, exc) from None

    def _unreachable(self, action: str, exc: BaseException) -> Unavailable:
        logger.warning(
            "blob store: %s failed, S3 bucket %r at %s unreachable (%s)",
            action,
            self.bucket,
            self.endpoint,
            type(exc).__name__,
        )
        return Unavailable(UNREACHABLE)

    def _client_error(self, exc: ClientError, action: str) -> ModelgridError:
        code, status = _code(exc), _status(exc)
        logger.warning(
            "blob store: %s in S3 bucket %r at %s failed: %s (HTTP %s)",
            action,
            self.bucket,
            self.endpoint,
            code,
            status,
        )
        if status == 403 or code in _DENIED_CODES:
            return FailedPrecondition(
                f"the registry's blob store (S3) denied it access ({code or status}); its operator must check the "
                "registry's S3 credentials and the bucket's policy"
            )
        if code == "NoSuchBucket":
            return FailedPrecondition(
                "the registry's blob store (S3) has lost its bucket; its operator must restore it"
            )
        if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            return Unavailable(f"the registry's blob store (S3) is failing ({code or status}); retry in a few seconds")
        # Any other refusal (400, 409, a KMS error...) comes back the same when retried: the operator's to fix.
        return FailedPrecondition(
            f"the registry's blob store (S3) refused a request ({code or status}); its operator must check the "
            "bucket's configuration"
        )

    # -- writes ------------------------------------------------------------------------------------------------

    def writer(self, max_bytes: int) -> S3BlobWriter:
        return S3BlobWriter(self, max_bytes)

    def resumable_writer(self, digest: str, offset: int, max_bytes: int) -> S3BlobWriter:
        """Resumes from this instance's staging directory only (see the module doc)."""
        self.staging.sweep_uploads()
        return S3BlobWriter(self, max_bytes, resume=(digest, offset))

    def received(self, digest: str) -> int:
        return self.staging.received(digest)

    def put(self, digest: str, path: Path, size: int) -> None:
        """Uploads a verified staged file as the blob `digest`, unless the bucket holds it already."""
        stored = self._head(digest)
        if stored == size:
            return  # identical bytes are already stored (content-addressed)
        if stored is not None:
            logger.warning("blob store: object %s holds %d bytes, not %d: uploading it again", digest, stored, size)
        with self._calls(f"upload of blob {digest}"):
            self._client.upload_file(str(path), self.bucket, self.key(digest), Config=self._transfer)
        logger.debug("blob store: uploaded %s (%d bytes)", digest, size)

    # -- reads -------------------------------------------------------------------------------------------------

    def _head(self, digest: str) -> int | None:
        """The stored object's size, None when there is none."""
        key = self.key(check_digest(digest))
        with self._calls(f"stat of blob {digest}"):
            try:
                return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
            except ClientError as exc:
                if _status(exc) == 404 or _code(exc) in _MISSING_CODES:
                    return None
                raise

    def exists(self, digest: str) -> bool:
        return self._head(digest) is not None

    def size(self, digest: str) -> int:
        size = self._head(digest)
        if size is None:
            raise DataLoss(f"artifact {digest} is recorded but missing from the blob store")
        return size

    def _get(self, digest: str, start: int, end: int | None = None):
        """The streaming body of the blob's bytes from `start` (to `end` inclusive), None past its end."""
        kwargs = {"Bucket": self.bucket, "Key": self.key(digest)}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        with self._calls(f"read of blob {digest}"):
            try:
                return self._client.get_object(**kwargs)["Body"]
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES or (_status(exc) == 404 and _code(exc) != "NoSuchBucket"):
                    raise NotFound(f"no blob {digest}") from None
                if _status(exc) == 416 or _code(exc) == "InvalidRange":
                    return None  # from the very end: nothing to send
                raise

    def read(self, digest: str, offset: int, chunk_bytes: int) -> Iterator[bytes]:
        """A generator: nothing is requested before the first chunk is asked for (the caller asks in a thread)."""
        position = offset
        breaks = 0
        while True:
            body = self._get(digest, position)
            if body is None:
                return
            try:
                with self._calls(f"read of blob {digest}"):
                    try:
                        for chunk in body.iter_chunks(chunk_bytes):
                            position += len(chunk)
                            yield chunk
                        return
                    except (BotoConnectionError, HTTPClientError) as exc:
                        breaks += 1
                        if breaks >= self.max_attempts:
                            raise
                        logger.info(
                            "blob store: read of %s broke at byte %d (%s); continuing",
                            digest,
                            position,
                            type(exc).__name__,
                        )
            finally:
                body.close()

    def open(self, digest: str) -> BinaryIO:
        size = self._head(digest)
        if size is None:
            raise NotFound(f"no blob {digest}")
        return io.BufferedReader(_RangeReader(self, digest, size), buffer_size=OPEN_BUFFER_BYTES)  # type: ignore[return-value]


class _RangeReader(io.RawIOBase):
    """A stored blob as a seekable read-only raw file: each read is one ranged GET."""

    def __init__(self, store: S3BlobStore, digest: str, size: int) -> None:
        self._store = store
        self._digest = digest
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        body = self._store._get(self._digest, self._position, self._position + wanted - 1)
        if body is None:
            return 0
        try:
            with self._store._calls(f"read of blob {self._digest}"):
                data = body.read()
        finally:
            body.close()
        view = memoryview(buffer).cast("B")
        view[: len(data)] = data
        self._position += len(data)
        return len(data)
