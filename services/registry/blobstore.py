"""Content-addressed artifact store: blobs named by their sha256, written once, never rewritten.

A blob is written to a temporary file while it is hashed, verified against the digest the client declared, then
committed with an atomic rename. Identical bytes are stored once. Temporary files left by a crash are removed when
the store opens. Uploads by digest (UploadBlob) are resumable: one cut short keeps its bytes under uploads/, locked
while a writer holds them, and the next upload of that digest continues from an offset up to their size; kept
bytes nobody resumes are removed after `resume_ttl_seconds`. A full disk or quota (ENOSPC, EDQUOT) on any step
of an upload drops the staged bytes and raises ResourceExhausted; what is stored already stays readable.
`BlobStore` is the interface of a backend: `LocalBlobStore` here (a directory), `S3BlobStore` in blobstore_s3 (a
bucket of an S3-compatible store); `open_blob_store` builds the one the settings name
(MODELGRID_REGISTRY_BLOB_BACKEND).
"""

import abc
import errno
import fcntl
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from modelgrid.client.artifacts import check_digest
from modelgrid.client.errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

if TYPE_CHECKING:
    from services.registry.settings import RegistrySettings

CHUNK = 1 << 20

logger = logging.getLogger(__name__)


class BlobWriter(abc.ABC):
    """An upload in progress."""

    size: int
    resumable: bool = False
    """Whether `suspend` keeps the bytes for a later upload of the same digest."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Appends bytes; raises ResourceExhausted past the size limit or when the store is out of space (the
        upload is then aborted)."""

    @property
    @abc.abstractmethod
    def staged_path(self) -> Path:
        """A local file holding the bytes written so far (for inspection before commit)."""

    @abc.abstractmethod
    def commit(self, expected_digest: str) -> str:
        """Verifies the digest and makes the blob permanent; on a mismatch aborts and raises InvalidArgument, out
        of space aborts and raises ResourceExhausted."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops the upload; safe to call more than once."""

    def suspend(self) -> None:
        """The upload was cut short (the client went away): a resumable writer keeps the bytes received for the
        next upload of the same digest; any other aborts."""
        self.abort()


class BlobStore(abc.ABC):
    """Where artifact bytes live."""

    @abc.abstractmethod
    def writer(self, max_bytes: int) -> BlobWriter:
        """Starts an upload of at most `max_bytes`."""

    @abc.abstractmethod
    def resumable_writer(self, digest: str, offset: int, max_bytes: int) -> BlobWriter:
        """Starts or resumes the upload of a blob whose digest is known, its chunks starting at `offset` (at most
        `received(digest)`); FailedPrecondition past what was received, Aborted while another upload of the
        digest runs."""

    @abc.abstractmethod
    def received(self, digest: str) -> int:
        """Bytes an interrupted upload of this digest left to resume from (0 if none)."""

    @abc.abstractmethod
    def exists(self, digest: str) -> bool:
        """Whether a blob with this digest is stored."""

    @abc.abstractmethod
    def size(self, digest: str) -> int:
        """Size of a stored blob; NotFound when absent."""

    @abc.abstractmethod
    def read(self, digest: str, offset: int, chunk_bytes: int) -> Iterator[bytes]:
        """The blob's bytes from `offset`, in chunks."""

    @abc.abstractmethod
    def open(self, digest: str) -> BinaryIO:
        """A stored blob as a seekable binary file (for inspection); NotFound when absent."""


_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "its disk quota is exceeded"}


class LocalBlobWriter(BlobWriter):
    """Writes into <root>/tmp (or <root>/uploads/<digest>.part, resumable), renames into <root>/sha256/<ab>/<digest>
    on commit."""

    def __init__(self, store: "LocalBlobStore", max_bytes: int, resume: tuple[str, int] | None = None) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0
        self.resumable = resume is not None
        if resume is None:
            self._path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
            with self._space_errors():
                self._file = self._path.open("wb")
            return
        digest, offset = resume
        self._path = store.upload_path(digest)
        self._file = _open_locked(self._path)
        try:
            held = os.fstat(self._file.fileno()).st_size
            if not 0 <= offset <= held:
                raise FailedPrecondition(
                    f"cannot resume the upload of blob {digest} at byte {offset}: the registry holds {held} bytes "
                    "of it (StatUpload); upload from there or from 0"
                )
            if offset > max_bytes:
                raise ResourceExhausted(f"offset {offset} is past the registry's limit of {max_bytes} bytes")
            self._file.truncate(offset)
            while offset - self.size and (data := self._file.read(min(CHUNK, offset - self.size))):
                self._hash.update(data)  # the bytes kept from before, hashed again
                self.size += len(data)
        except BaseException:
            self._file.close()
            raise

    @contextmanager
    def _space_errors(self) -> Iterator[None]:
        """A full disk or quota in the block (write, flush, fsync, mkdir, rename): drops the upload and raises
        ResourceExhausted with a message for the client that names no server path (the log has it)."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            self.abort()
            logger.error("blob store %s: %s; refused an upload after %d bytes", self._store.root, exc, self.size)
            raise ResourceExhausted(
                f"the registry's blob store is out of space ({_NO_SPACE[exc.errno]}): the upload was discarded "
                f"after {self.size} bytes and nothing was stored; free space on the registry's blob volume (or "
                "ask its operator to), then upload again"
            ) from exc

    @property
    def staged_path(self) -> Path:
        with self._space_errors():
            self._file.flush()
        return self._path

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self._max_bytes:
            self.abort()
            raise ResourceExhausted(
                f"artifact is larger than the registry's limit of {self._max_bytes} bytes "
                "(setting MODELGRID_REGISTRY_MAX_ARTIFACT_BYTES)"
            )
        with self._space_errors():
            self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def _verify(self, expected_digest: str) -> str:
        """The digest of the bytes written; on a mismatch with `expected_digest` aborts and raises InvalidArgument."""
        actual = self._hash.hexdigest()
        if actual != expected_digest:
            self.abort()
            raise InvalidArgument(
                f"artifact digest mismatch: declared {expected_digest}, received bytes hash to {actual} "
                f"({self.size} bytes); the upload was discarded"
            )
        return actual

    def commit(self, expected_digest: str) -> str:
        actual = self._verify(expected_digest)
        with self._space_errors():
            self._file.flush()
            os.fsync(self._file.fileno())
            final = self._store.blob_path(actual)
            if final.exists():
                self._path.unlink()  # identical bytes are already stored
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._path, final)  # before close: a resumable upload's lock is held until it is moved
                _fsync_dir(final.parent)
            self._file.close()
        return actual

    def suspend(self) -> None:
        if not self.resumable:
            self.abort()
            return
        try:
            self._file.close()  # flushes; the lock goes with the file
        except OSError as exc:
            logger.warning("keeping an interrupted upload failed (%s); it starts again from 0", exc)
            self._path.unlink(missing_ok=True)

    def abort(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            try:
                file.close()  # flushes what is buffered: fails again on a full disk, and closes the file anyway
            except OSError as exc:
                logger.debug("closing the aborted upload %s: %s", self._path.name, exc)
        self._path.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    """Blobs in a local directory (a shared volume in deployments)."""

    def __init__(self, root: str | os.PathLike, resume_ttl_seconds: float = 24 * 3600) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.uploads_dir = self.root / "uploads"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(exist_ok=True)
        (self.root / "sha256").mkdir(exist_ok=True)
        self._resume_ttl = resume_ttl_seconds
        stale = list(self.tmp_dir.iterdir())
        for path in stale:
            path.unlink()
        if stale:
            logger.info("removed %d unfinished uploads left by an earlier process", len(stale))
        self.sweep_uploads()

    def upload_path(self, digest: str) -> Path:
        """Where the bytes of a resumable upload of this digest are kept."""
        return self.uploads_dir / f"{check_digest(digest)}.part"

    def sweep_uploads(self) -> int:
        """Removes interrupted uploads untouched for longer than the resume TTL (none that a writer holds)."""
        cutoff = time.time() - self._resume_ttl
        removed = 0
        for path in self.uploads_dir.glob("*.part"):
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
                file = _open_locked(path)
            except (FileNotFoundError, Aborted):
                continue
            with file:
                path.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info("removed %d interrupted uploads older than %.0f s", removed, self._resume_ttl)
        return removed

    def resumable_writer(self, digest: str, offset: int, max_bytes: int) -> LocalBlobWriter:
        self.sweep_uploads()
        return LocalBlobWriter(self, max_bytes, resume=(digest, offset))

    def received(self, digest: str) -> int:
        try:
            return self.upload_path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def blob_path(self, digest: str) -> Path:
        """Where a blob with this digest lives."""
        return self.root / "sha256" / digest[:2] / digest

    def writer(self, max_bytes: int) -> LocalBlobWriter:
        return LocalBlobWriter(self, max_bytes)

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise DataLoss(f"artifact {digest} is recorded but missing from the blob store") from None

    def read(self, digest: str, offset: int, chunk_bytes: int) -> Iterator[bytes]:
        path = self.blob_path(digest)
        if not path.exists():
            raise NotFound(f"no blob {digest}")
        with path.open("rb") as f:
            f.seek(offset)
            while chunk := f.read(chunk_bytes):
                yield chunk

    def open(self, digest: str) -> BinaryIO:
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise NotFound(f"no blob {digest}") from None


class BlobStoreConfigError(RuntimeError):
    """The configured blob store cannot be used (a missing bucket, no access, an unreachable endpoint): the registry
    does not start. The message names the store, never a credential."""


def open_blob_store(settings: "RegistrySettings") -> BlobStore:
    """The backend the settings name, checked: "local" (blob_dir) or "s3" (the bucket must exist and answer, else
    BlobStoreConfigError). Blocking: call it from a thread when an event loop runs."""
    if settings.blob_backend == "s3":
        from services.registry.blobstore_s3 import S3BlobStore  # boto3 is imported only when it is used

        store = S3BlobStore.from_settings(settings)
        store.check()
        return store
    return LocalBlobStore(settings.blob_dir, settings.upload_resume_ttl_seconds)


def _open_locked(path: Path) -> BinaryIO:
    """Opens (creating) a resumable upload's file for reading and writing with an exclusive lock held; Aborted when
    another writer holds it. A file moved away (committed) while this one waited is not taken: the path is opened
    again."""
    while True:
        file = open(path, "a+b")  # noqa: SIM115 - the caller owns the open file and its lock
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise Aborted(
                f"another upload of blob {path.stem} is in progress; try again once it ends (StatUpload shows it)"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            file.seek(0)
            return file
        file.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
