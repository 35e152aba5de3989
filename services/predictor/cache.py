"""A bounded, content-addressed cache of unpacked model artifacts on local disk.

Entries are directories named by artifact digest, so two versions with the same bytes share one entry and a
replica restart finds what it downloaded before. Entries in use are pinned; when the cache is over its size
bound, the least recently used unpinned entries are removed. A download cut short keeps its bytes (`.partial-<digest>`)
and the next try, in this process or after a restart, resumes from them; they count towards the bound like entries.

Several processes may share one cache (the processes of a multi-process replica, kit.replica). Each digest has a
lock file (`.lock-<digest>`, flock): a process fills an entry holding it exclusively (the others wait, then find the
entry), pins an entry by holding it shared, and evicts an entry only if it can take it exclusively, which no
process can while another uses the entry or fills it.
"""

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from modelgrid.client.artifacts import unpack

logger = logging.getLogger(__name__)

Fetch = Callable[[Path], Awaitable[None]]  # downloads the artifact (verified) into the given file, resuming
PARTIAL = ".partial-"
LOCK = ".lock-"
LOCK_POLL_SECONDS = 0.05


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ArtifactCache:
    """Unpacked artifacts under `root`, at most about `max_bytes` of them."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._pins: dict[str, int] = {}
        self._pin_fds: dict[str, int] = {}  # digest -> the lock file held shared while this process uses the entry
        self._locks: dict[str, asyncio.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-*"):  # .tmp-<digest>-<id>: left by a fill that died, unless one runs now
            with self._exclusive(leftover.name.split("-")[1]) as mine:
                if mine:
                    shutil.rmtree(leftover, ignore_errors=True)

    async def acquire(self, digest: str, fetch: Fetch) -> Path:
        """The unpacked directory of an artifact, downloading it with `fetch` unless cached; pins it."""
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            entry = self.root / digest
            if digest not in self._pin_fds:
                self._pin_fds[digest] = await self._pin(entry, fetch)
            os.utime(entry)  # last use, for eviction order
            self._pins[digest] = self._pins.get(digest, 0) + 1
        await asyncio.to_thread(self._evict)
        return entry

    async def _pin(self, entry: Path, fetch: Fetch) -> int:
        """Fills the entry unless some process did, and returns its lock file held shared (no process evicts it)."""
        while True:
            if entry.is_dir():
                fd = await self._lock(entry.name, fcntl.LOCK_SH)  # waits out a process evicting it
                if entry.is_dir():
                    return fd
                os.close(fd)  # evicted meanwhile
                continue
            # Fill it, unless another process is filling it: then wait until it is there and pin it.
            fd = await self._lock(entry.name, fcntl.LOCK_EX, give_up=entry.is_dir)
            if fd < 0:
                continue
            try:
                if not entry.is_dir():
                    await self._fill(entry, fetch)
                fcntl.flock(fd, fcntl.LOCK_SH)  # never blocks: this process held it exclusively
            except BaseException:
                os.close(fd)
                raise
            return fd

    async def _lock(self, digest: str, mode: int, give_up: Callable[[], bool] | None = None) -> int:
        """An open descriptor of the digest's lock file, locked in `mode`, or -1 once `give_up()` is true while it
        waits. Polls, so that a cancelled caller never leaves a thread blocked on the lock."""
        path = self.root / f"{LOCK}{digest}"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if give_up is not None and give_up():
                            os.close(fd)
                            return -1
                        await asyncio.sleep(LOCK_POLL_SECONDS)
                if _same_file(fd, path):  # an evicting process may have removed the file we opened
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self, digest: str) -> None:
        """Unpins an entry acquired before."""
        count = self._pins.get(digest, 0) - 1
        if count > 0:
            self._pins[digest] = count
        else:
            self._pins.pop(digest, None)
            fd = self._pin_fds.pop(digest, None)
            if fd is not None:
                os.close(fd)

    async def _fill(self, entry: Path, fetch: Fetch) -> None:
        staging = self.root / f".tmp-{entry.name}-{uuid.uuid4().hex}"
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
        """Least recently used first: entries and downloads cut short that no process uses or fills now."""
        entries = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
        entries += list(self.root.glob(f"{PARTIAL}*"))
        sizes = {}
        for path in entries:  # a fill (here or in another process) may finish and remove its partial file meanwhile
            try:
                sizes[path] = _tree_size(path) if path.is_dir() else path.stat().st_size
            except FileNotFoundError:
                continue
        entries = list(sizes)
        total = sum(sizes.values())
        for path in sorted(entries, key=_mtime):
            if total <= self.max_bytes:
                break
            digest = path.name.removeprefix(PARTIAL)
            if self._pins.get(digest) or (self._locks.get(digest) and self._locks[digest].locked()):
                continue
            with self._exclusive(digest) as mine:
                if not mine:
                    continue  # another process uses or fills it
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            total -= sizes[path]
            logger.info("evicted %s from the artifact cache", path.name[:12])

    @contextlib.contextmanager
    def _exclusive(self, digest: str):
        """Yields True holding the digest's lock exclusively, False when some process holds it."""
        path = self.root / f"{LOCK}{digest}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            if not _same_file(fd, path):
                yield False
                return
            yield True
            if not (self.root / digest).exists() and not (self.root / f"{PARTIAL}{digest}").exists():
                path.unlink(missing_ok=True)  # nothing left to lock; openers check they locked the current file
        finally:
            os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
