"""Files only their owner may read: the secrets made at setup (certificate keys, Consul tokens, Redis's password)."""

import os
from pathlib import Path


def write_private_file(path: Path, content: str | bytes) -> None:
    """Writes `content` to `path` with mode 0600 (created so, never readable by others even for a moment), replacing
    the file atomically if it exists; its directory is made (mode 0700) if missing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(content.encode() if isinstance(content, str) else content)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
