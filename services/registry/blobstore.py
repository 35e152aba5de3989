"""Content-addressed artifact store: blobs named by their sha256, written once, never rewritten.

A blob is written to a temporary file while it is hashed, verified against the digest the client declared, then
committed with an atomic rename. Identical bytes are stored once. Temporary files left by a crash are removed when
the store opens. A full disk or quota (ENOSPC, EDQUOT) on any step of an upload drops the staged bytes and raises
ResourceExhausted; what is stored already stays readable. `BlobStore` is the interface an object-store backend would
implement.
"""

import abc
import errno
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from services.kit.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted

logger = logging.getLogger(__name__)


class BlobWriter(abc.ABC):
    """An upload in progress."""

    size: int

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


class BlobStore(abc.ABC):
    """Where artifact bytes live."""

    @abc.abstractmethod
    def writer(self, max_bytes: int) -> BlobWriter:
        """Starts an upload of at most `max_bytes`."""

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


def check_digest(digest: str) -> str:
    """Returns a lower-case sha256 hex digest or raises InvalidArgument."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidArgument(f"artifact digest must be 64 lower-case hex characters (sha256), got {digest!r}")
    return digest


_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "its disk quota is exceeded"}


class LocalBlobWriter(BlobWriter):
    """Writes into <root>/tmp, renames into <root>/sha256/<ab>/<digest> on commit."""

    def __init__(self, store: "LocalBlobStore", max_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._hash = hashlib.sha256()
        self.size = 0
        with self._space_errors():
            self._file = self._path.open("wb")

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

    def commit(self, expected_digest: str) -> str:
        actual = self._hash.hexdigest()
        if actual != expected_digest:
            self.abort()
            raise InvalidArgument(
                f"artifact digest mismatch: declared {expected_digest}, received bytes hash to {actual} "
                f"({self.size} bytes); the upload was discarded"
            )
        with self._space_errors():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.blob_path(actual)
            if final.exists():
                self._path.unlink()  # identical bytes are already stored
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._path, final)
                _fsync_dir(final.parent)
        return actual

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

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(exist_ok=True)
        stale = list(self.tmp_dir.iterdir())
        for path in stale:
            path.unlink()
        if stale:
            logger.info("removed %d unfinished uploads left by an earlier process", len(stale))

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
