"""Reading a worker's progress file as it grows: complete JSON-object lines only."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PROGRESS_READ_BYTES = 1024 * 1024
MAX_PROGRESS_LINE_BYTES = 1024 * 1024


@dataclass
class ProgressTail:
    """Complete lines appended to a file since the last read; a partial last line waits for its newline."""

    path: Path
    offset: int = 0
    partial: bytes = field(default=b"", repr=False)

    def read(self, final: bool = False) -> list[str]:
        lines: list[bytes] = []
        while True:
            try:
                with self.path.open("rb") as file:
                    file.seek(self.offset)
                    data = file.read(PROGRESS_READ_BYTES)
            except FileNotFoundError:
                data = b""
            self.offset += len(data)
            *complete, self.partial = (self.partial + data).split(b"\n")
            lines += complete
            if len(self.partial) > MAX_PROGRESS_LINE_BYTES:
                logger.warning("%s: dropping a progress line longer than %d bytes", self.path, len(self.partial))
                self.partial = b""
            if not final or not data:
                break
        if final:
            lines.append(self.partial)  # the process is gone: no newline will come
            self.partial = b""
        return [text for line in lines if (text := _json_object_line(line, self.path))]


def _json_object_line(line: bytes, path: Path) -> str:
    """The line if it is a JSON object (what a progress line is), else "" (logged unless blank)."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    try:
        if isinstance(json.loads(text), dict):
            return text
    except ValueError:
        pass
    logger.warning("%s: skipping a progress line that is not a JSON object: %.200s", path, text)
    return ""
