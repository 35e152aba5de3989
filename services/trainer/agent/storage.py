"""What an agent moves between its host and the registry (no gRPC here beyond the registry's typed client): data
sets into a content-addressed cache, the checkpoint a group resumes from, and the checkpoints and SavedModel a
chief announces. No other host's path is ever read: every byte arrives and leaves through the registry's API.

Layout under the agent's work directory::

    cache/sha256/<digest>       a data set blob, verified against its digest (downloaded once, kept)
    cache/tmp/                  downloads and tars in progress (emptied when the agent opens)
"""

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from modelgrid.client.artifacts import check_digest, file_digest, unpack
from modelgrid.client.errors import Aborted, DataLoss, DeadlineExceeded, ModelgridError, Unavailable
from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent.types import Checkpoint, Export
from services.kit.streams import Backoff

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = (Unavailable, DeadlineExceeded, DataLoss, Aborted)
"""Transfer failures that another try can cure: the registry down or restarting, a stream cut, corrupted bytes, an
upload cut short that the registry still holds (ABORTED until it notices)."""


async def with_retries(what: str, call: Callable[[], Awaitable[T]], seconds: float) -> T:
    """`call()`, tried again with backoff while it fails with a retryable error, for up to `seconds`; then the last
    error."""
    deadline = time.monotonic() + seconds
    backoff = Backoff(initial=0.5, maximum=10.0)
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            delay = min(backoff.next(), left)
            logger.warning("%s failed (%s); trying again in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


class BlobCache:
    """Registry blobs on this host, by digest: each downloaded once, verified, and kept.

    A cached file is verified against its digest before it is used (once per change of its size or mtime): an entry
    that does not match (a corrupted disk, a hand edit) is downloaded again.
    """

    def __init__(self, root: Path, registry: AsyncRegistryClient, retry_seconds: float) -> None:
        self._root = root
        self._tmp = root / "tmp"
        self._registry = registry
        self._retry_seconds = retry_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._verified: dict[str, tuple[int, int]] = {}  # digest -> (size, mtime_ns) when last verified
        self.downloads = 0
        """Blobs downloaded since the agent started (a hit in the cache downloads nothing)."""

    def open(self) -> None:
        """Creates the cache's directories and drops downloads an earlier process left unfinished."""
        (self._root / "sha256").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)

    def path(self, digest: str) -> Path:
        """Where the blob with this digest is cached."""
        return self._root / "sha256" / check_digest(digest)

    def scratch(self, prefix: str) -> Path:
        """A new empty directory for a transfer in progress (removed by its user, or when the agent opens)."""
        directory = self._tmp / f"{prefix}-{uuid.uuid4().hex[:12]}"
        directory.mkdir(parents=True)
        return directory

    async def fetch(self, digest: str) -> Path:
        """The cached file of a blob, downloaded (and verified) unless a verified copy is there already."""
        path = self.path(digest)
        async with self._locks.setdefault(digest, asyncio.Lock()):
            if await asyncio.to_thread(self._is_valid, path, digest):
                return path
            what = f"downloading blob {digest[:12]}"
            await with_retries(what, lambda: self._download(digest, path), self._retry_seconds)
            return path

    def _is_valid(self, path: Path, digest: str) -> bool:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if self._verified.get(digest) == (stat.st_size, stat.st_mtime_ns):
            return True
        if file_digest(path) == digest:
            self._verified[digest] = (stat.st_size, stat.st_mtime_ns)
            return True
        logger.warning("cached blob %s does not match its digest: downloading it again", digest)
        path.unlink(missing_ok=True)
        return False

    async def _download(self, digest: str, path: Path) -> None:
        partial = self._tmp / f"{digest}.partial"  # kept when the stream is cut: the next try resumes from it
        await self._registry.download_blob(digest, partial)  # DataLoss (partial removed) unless the digest matches
        os.replace(partial, path)
        stat = path.stat()
        self._verified[digest] = (stat.st_size, stat.st_mtime_ns)
        self.downloads += 1
        logger.info("downloaded blob %s (%d bytes) into the cache", digest, stat.st_size)


async def restore_checkpoint(
    cache: BlobCache, registry: AsyncRegistryClient, checkpoint: Checkpoint, into: Path, retry_seconds: float
) -> None:
    """Downloads a checkpoint blob (verified) and unpacks it as `into` (which it replaces). The tar is not kept:
    checkpoints are per job, unlike data sets."""
    check_digest(checkpoint.digest)
    scratch = cache.scratch("restore")
    try:
        tar = scratch / "checkpoint.tar"
        await with_retries(
            f"downloading checkpoint {checkpoint.digest[:12]}",
            lambda: registry.download_blob(checkpoint.digest, tar),
            retry_seconds,
        )
        unpacked = scratch / "unpacked"
        await asyncio.to_thread(unpack, tar, unpacked)
        await asyncio.to_thread(shutil.rmtree, into, True)
        into.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.move, unpacked, into)
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)


@dataclass
class _Pending:
    kind: str  # "checkpoint" or "export"
    path: Path
    step: int = 0


class OutputUploads:
    """Uploads what one worker announces, one at a time: its checkpoint snapshots (only the newest waiting one: an
    older snapshot not yet sent is dropped) and its SavedModel. `on_change()` is called after each upload ends, done
    or failed; `checkpoint`, `export` and `error` say how they went.

    Each announced path must lie in the directory the agent gave the worker for it (`snapshots` for checkpoints,
    `export_dir` for the SavedModel); anything else is refused.
    """

    def __init__(
        self,
        name: str,
        registry: AsyncRegistryClient,
        cache: BlobCache,
        *,
        snapshots: Path,
        export_dir: Path,
        max_bytes: int,
        retry_seconds: float,
        on_change: Callable[[], None],
    ) -> None:
        self._name = name
        self._registry = registry
        self._cache = cache
        self._snapshots = snapshots.resolve()
        self._export_dir = export_dir.resolve()
        self._max_bytes = max_bytes
        self._retry_seconds = retry_seconds
        self._on_change = on_change
        self._checkpoint: _Pending | None = None
        self._export: _Pending | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._cancelled = False
        self._task: asyncio.Task | None = None
        self.checkpoint: Checkpoint | None = None
        self.export: Export | None = None
        self.error = ""

    def add_checkpoint(self, step: int, path: str) -> None:
        """A snapshot of the checkpoint at `step` to upload (replacing an older one not sent yet)."""
        snapshot = Path(path).resolve()
        if snapshot.parent != self._snapshots:
            logger.warning("%s: ignoring a checkpoint outside its snapshots directory: %s", self._name, path)
            return
        if self._checkpoint is not None and self._checkpoint.path != snapshot:
            shutil.rmtree(self._checkpoint.path, ignore_errors=True)  # superseded before it was sent
        self._checkpoint = _Pending("checkpoint", snapshot, step)
        self._kick()

    def add_export(self, path: str) -> None:
        """The SavedModel the worker wrote, to upload."""
        if Path(path).resolve() != self._export_dir:
            logger.warning("%s: ignoring an export outside its export directory: %s", self._name, path)
            return
        self._export = _Pending("export", self._export_dir)
        self._kick()

    def _kick(self) -> None:
        if self._cancelled:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"uploads {self._name}")
        self._wake.set()

    async def finish(self) -> None:
        """Returns once everything announced so far is uploaded or given up (the worker has exited)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    def cancel(self) -> None:
        """Drops what is not uploaded yet, and refuses more (the agent stops)."""
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (item := self._take()) is not None:
                await self._upload(item)
            if self._closing:
                return

    def _take(self) -> _Pending | None:
        item, self._checkpoint = self._checkpoint, None
        if item is None:
            item, self._export = self._export, None
        return item

    async def _upload(self, item: _Pending) -> None:
        what = f"uploading the {item.kind}" + (f" at step {item.step}" if item.kind == "checkpoint" else "")
        scratch = self._cache.scratch("upload")
        try:
            blob = await with_retries(
                f"{self._name}: {what}",
                lambda: self._registry.upload_directory(item.path, scratch_dir=scratch, max_bytes=self._max_bytes),
                self._retry_seconds,
            )
        except (ModelgridError, OSError, ValueError) as exc:
            self.error = f"{what} failed: {exc}"
            logger.warning("%s: %s", self._name, self.error)
        else:
            logger.info("%s: %s done: blob %s, %d bytes", self._name, what, blob.digest, blob.size_bytes)
            if item.kind == "checkpoint":
                if self.checkpoint is None or item.step >= self.checkpoint.step:
                    self.checkpoint = Checkpoint(blob.digest, item.step, blob.size_bytes)
            else:
                self.export = Export(blob.digest, blob.size_bytes)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if item.kind == "checkpoint":
                with contextlib.suppress(OSError):
                    shutil.rmtree(item.path)
        self._on_change()
