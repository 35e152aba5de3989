"""A bounded, content-addressed cache of unpacked model artifacts on local disk.

Entries are directories named by artifact digest, so two versions with the same bytes share one entry and a
replica restart finds what it downloaded before. Entries in use are pinned; when the cache is over its size
bound, the least recently used unpinned entries are removed. A download cut short keeps its bytes (`.partial-<digest>`)
and the next try, in this process or after a restart, resumes from them; they count towards the bound like entries.
"""

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.kit.artifacts import unpack

logger = logging.getLogger(__name__)

Fetch = Callable[[Path], Awaitable[None]]  # downloads the artifact (verified) into the given file, resuming
PARTIAL = ".partial-"


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ArtifactCache:
    """Unpacked artifacts under `root`, at most about `max_bytes` of them."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._pins: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    async def acquire(self, digest: str, fetch: Fetch) -> Path:
        """The unpacked directory of an artifact, downloading it with `fetch` unless cached; pins it."""
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            entry = self.root / digest
            if not entry.is_dir():
                await self._fill(entry, fetch)
            os.utime(entry)  # last use, for eviction order
            self._pins[digest] = self._pins.get(digest, 0) + 1
        await asyncio.to_thread(self._evict)
        return entry

    def release(self, digest: str) -> None:
        """Unpins an entry acquired before."""
        count = self._pins.get(digest, 0) - 1
        if count > 0:
            self._pins[digest] = count
        else:
            self._pins.pop(digest, None)

    async def _fill(self, entry: Path, fetch: Fetch) -> None:
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        blob = self.root / f"{PARTIAL}{entry.name}"  # kept when the download is cut short: the next try resumes
        try:
            started = time.monotonic()
            await fetch(blob)
            await asyncio.to_thread(unpack, blob, staging / "unpacked")
            os.replace(staging / "unpacked", entry)
            blob.unlink()
            logger.info("cached %s in %.2fs", entry.name[:12], time.monotonic() - started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _evict(self) -> None:
        """Least recently used first: unpinned entries, and downloads cut short that no fill is resuming now."""
        entries = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
        entries += [p for p in self.root.glob(f"{PARTIAL}*") if not self._filling(p.name.removeprefix(PARTIAL))]
        sizes = {p: _tree_size(p) if p.is_dir() else p.stat().st_size for p in entries}
        total = sum(sizes.values())
        for path in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if self._pins.get(path.name):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            total -= sizes[path]
            logger.info("evicted %s from the artifact cache", path.name[:12])

    def _filling(self, digest: str) -> bool:
        lock = self._locks.get(digest)
        return lock is not None and lock.locked()
