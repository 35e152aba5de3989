"""How the CLI shows results: rich tables and progress bars for people, protobuf JSON for programs.

Results go to stdout; progress bars and errors go to stderr, so `--json` output can be piped as is.
"""

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, RenderableType
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from modelgrid.client.registry import Progress as ProgressCallback

logger = logging.getLogger(__name__)

PIPE_WIDTH = 1000
"""Line width of tables when stdout is not a terminal."""


class Output:
    """Where a command writes its results (stdout) and its progress and errors (stderr)."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        # markup off: names, descriptions and tags are user text and must never be read as rich markup.
        self._stdout = Console(highlight=False, markup=False)
        if not self._stdout.is_terminal:  # piped: one line per row, nothing cut to fit an imagined 80 columns
            self._stdout = Console(highlight=False, markup=False, width=PIPE_WIDTH)
        self._stderr = Console(stderr=True, highlight=False, markup=False)

    def message(self, message: Message) -> None:
        """Prints a protobuf message as canonical protobuf JSON (every field, defaults included)."""
        text = json_format.MessageToJson(message, always_print_fields_with_no_presence=True, sort_keys=True)
        sys.stdout.write(text + "\n")

    def json(self, value: object) -> None:
        """Prints plain data (no protobuf message of its own, e.g. a canary's state) as JSON with sorted keys."""
        sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")

    def line(self, text: str) -> None:
        """Prints one plain line of result, never wrapped or styled."""
        sys.stdout.write(text + "\n")

    def note(self, text: str) -> None:
        """Prints a remark for people (e.g. "no models") on stderr, so it never pollutes piped results."""
        sys.stderr.write(text + "\n")

    def error(self, text: str) -> None:
        """Prints `error: <text>` on stderr."""
        sys.stderr.write(f"error: {text}\n")

    def render(self, renderable: RenderableType) -> None:
        """Prints a rich table or grid on stdout (piped: without the padding that ends each line)."""
        if self._stdout.is_terminal:
            self._stdout.print(renderable)
            return
        with self._stdout.capture() as captured:
            self._stdout.print(renderable)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))

    @contextmanager
    def transfer(self, description: str) -> Iterator[ProgressCallback]:
        """Shows an upload or download on stderr; yields the (bytes done, bytes total) callback to feed.

        On a terminal: a moving progress bar, removed if the transfer fails so that the error is what remains.
        Otherwise (a file, a pipe, a test): one summary line once the transfer succeeded."""
        if self._stderr.is_terminal:
            with self._progress_bar(description) as update:
                yield update
        else:
            with _summary_line(description) as update:
                yield update

    @contextmanager
    def _progress_bar(self, description: str) -> Iterator[ProgressCallback]:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self._stderr) as progress:
            task = progress.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            try:
                yield update
            except BaseException:
                progress.live.transient = True
                raise


@contextmanager
def _summary_line(description: str) -> Iterator[ProgressCallback]:
    """Counts the bytes and writes "<description>: 20.5 kB in 0.1s" on stderr when the block succeeds."""
    done = 0
    started = time.monotonic()

    def update(transferred: int, total: int) -> None:
        nonlocal done
        done = transferred

    yield update
    sys.stderr.write(f"{description}: {decimal(done)} in {time.monotonic() - started:.1f}s\n")
