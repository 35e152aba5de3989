"""The artifact cache shared by several processes (a multi-process replica): one fill per artifact, and no process
evicts an entry another one uses. Two ArtifactCache objects on one directory stand for two processes: flock locks
belong to open files, so they exclude each other the same way."""

import asyncio
import shutil
from pathlib import Path

from modelgrid.client.artifacts import pack_to_file
from services.predictor.cache import ArtifactCache

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def artifact(tmp_path: Path, name: str, size: int) -> Path:
    source = tmp_path / f"src-{name}"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"x" * size)
    return Path(pack_to_file(source, tmp_path / f"{name}.tar") and tmp_path / f"{name}.tar")


class Fetches:
    """A fetch that copies a packed artifact, slowly, counting its calls."""

    def __init__(self, tar: Path, seconds: float = 0.0) -> None:
        self.tar, self.seconds, self.calls = tar, seconds, 0

    async def __call__(self, dest: Path) -> None:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        shutil.copyfile(self.tar, dest)


async def test_two_processes_filling_one_artifact_download_it_once(tmp_path):
    root = tmp_path / "cache"
    first, second = ArtifactCache(root, 1 << 30), ArtifactCache(root, 1 << 30)
    fetch = Fetches(artifact(tmp_path, "a", 1000), seconds=0.3)
    paths = await asyncio.gather(first.acquire(DIGEST_A, fetch), second.acquire(DIGEST_A, fetch))
    assert fetch.calls == 1
    assert paths[0] == paths[1] and (paths[0] / "weights.bin").read_bytes() == b"x" * 1000
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".partial-*"))


async def test_an_entry_one_process_uses_is_not_evicted_by_another(tmp_path):
    root = tmp_path / "cache"
    user, other = ArtifactCache(root, 1 << 30), ArtifactCache(root, 10)  # `other` is always over its bound
    used = await user.acquire(DIGEST_A, Fetches(artifact(tmp_path, "a", 1000)))
    await other.acquire(DIGEST_B, Fetches(artifact(tmp_path, "b", 1000)))
    other.release(DIGEST_B)
    await other.acquire(DIGEST_B, Fetches(artifact(tmp_path, "b2", 1000)))  # evicts what it can
    assert used.is_dir()  # pinned by `user`
    user.release(DIGEST_A)
    other.release(DIGEST_B)
    await other.acquire(DIGEST_B, Fetches(artifact(tmp_path, "b3", 1000)))
    assert not used.exists()  # nobody uses it any more


async def test_fills_running_side_by_side_never_trip_over_each_others_partial_files(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    tar = artifact(tmp_path, "a", 200_000)
    digests = [f"{i:x}" * 64 for i in range(1, 9)]
    fetches = [Fetches(tar, seconds=0.01 * i) for i in range(len(digests))]
    paths = await asyncio.gather(*(cache.acquire(d, f) for d, f in zip(digests, fetches, strict=True)))
    assert all((path / "weights.bin").stat().st_size == 200_000 for path in paths)
    assert [f.calls for f in fetches] == [1] * len(digests)
