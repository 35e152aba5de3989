"""Artifacts on the client side of the registry: SavedModel directories packed as deterministic tars, hashed,
and unpacked safely. The same directory always packs to the same bytes, so it always has the same digest."""

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from modelgrid.client.errors import InvalidArgument

CHUNK_BYTES = 1024 * 1024


def check_digest(digest: str) -> str:
    """A lower-case sha256 hex digest, or InvalidArgument. Checked before a digest names anything on disk (a blob,
    a cache entry): nothing else may."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidArgument(f"a digest must be 64 lower-case hex characters (sha256), got {digest[:80]!r}")
    return digest


def _tar_info(path: Path, arcname: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if path.is_dir():
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o644
        info.size = path.stat().st_size
    return info


def pack_directory(directory: str | os.PathLike, out: io.BufferedIOBase) -> None:
    """Writes `directory` as an uncompressed tar with sorted entries, zeroed times and owners and normalised
    modes. Symlinks and special files are refused: a model directory holds plain files only."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in [*dirnames, *sorted(filenames)]:
                path = base / name
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    raise ValueError(f"{path} is not a plain file or directory")
                info = _tar_info(path, path.relative_to(root).as_posix())
                if info.isdir():
                    tar.addfile(info)
                else:
                    with path.open("rb") as f:
                        tar.addfile(info, f)


def pack_to_file(directory: str | os.PathLike, tar_path: str | os.PathLike) -> str:
    """Packs `directory` into `tar_path` and returns the tar's sha256 (hex)."""
    with open(tar_path, "wb") as out:
        pack_directory(directory, out)
    return file_digest(tar_path)


def unpack(tar_path: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Extracts a packed artifact; entries that would land outside `directory` or are links are refused."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, mode="r:") as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(directory, filter="data")
        else:
            tar.extractall(directory, members=_plain_members(tar))


def _plain_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """What the "data" extraction filter lets through, for Pythons without it: regular files and directories at
    relative paths that stay inside the target; InvalidArgument for anything else."""
    members = tar.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if not (member.isfile() or member.isdir()) or Path(member.name).is_absolute() or ".." in parts:
            raise InvalidArgument(f"artifact entry {member.name[:64]!r} is not a plain file or directory inside it")
    return members


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_chunks(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES, offset: int = 0) -> Iterator[bytes]:
    """The bytes of a file from `offset`, in chunks."""
    with open(path, "rb") as f:
        f.seek(offset)
        yield from iter(lambda: f.read(chunk_bytes), b"")
