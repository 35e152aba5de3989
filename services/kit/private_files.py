"""Files only their owner may read: the secrets made at setup (certificate keys, Consul tokens, Redis's password)."""

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


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


def read_private_file(path: Path, what: str, error: type[Exception]) -> str:
    """The text in `path` without surrounding whitespace (a trailing newline, as `echo` writes); `error` naming
    `what` and the file, never its content, when it cannot be read; a warning when other users may read it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise error(f"cannot read the {what} file {path}: {reason}") from None
    if stat.S_IMODE(mode) & 0o077:
        logger.warning("the %s file %s may be read by other users (mode %03o): chmod 600 it", what, path, mode & 0o777)
    return text
