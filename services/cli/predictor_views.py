"""How predictor results look: output tensors as tables or JSON lists, served models, bulk jobs and their progress.

`--json` prints the protobuf messages instead, except for predictions, whose tensors print as JSON lists (their
protobuf JSON would be base64 bytes).
"""

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.cli.registry_views import _details, tensor_text, timestamp_text

logger = logging.getLogger(__name__)

TABLE_MAX_ROWS = 20
"""Outputs of up to this many rows (and TABLE_MAX_COLUMNS columns, rank 2 at most) print as a table."""
TABLE_MAX_COLUMNS = 12
PREVIEW_ROWS = 5
"""Rows of a larger output printed as JSON lists; the rest is counted (all of it: --output or --json)."""


def jsonable(array: np.ndarray) -> object:
    """Nested lists of an array. Floats narrower than float64 print as their shortest decimal (0.1, not
    0.10000000149011612), which reads back as the same value; strings (bytes) decode as UTF-8, undecodable bytes
    as backslash escapes."""
    if array.dtype.kind in ("O", "S"):
        decode = np.vectorize(lambda item: bytes(item).decode("utf-8", "backslashreplace"), otypes=[object])
        return decode(array).tolist() if array.size else array.tolist()
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()


def prediction_json(model: str, version: int, outputs: dict[str, np.ndarray]) -> dict:
    """What `predict --json` prints and `--output FILE.json` holds besides the outputs."""
    return {"model_name": model, "version": version, "outputs": {name: jsonable(outputs[name]) for name in outputs}}


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def output_fits_a_table(array: np.ndarray) -> bool:
    """Whether `output_table` shows all of an output compactly: rank 1 or 2, few rows and columns."""
    if array.ndim == 0 or array.ndim > 2:
        return False
    rows = array.shape[0] if array.ndim == 2 else 1
    columns = array.shape[-1]
    return rows <= TABLE_MAX_ROWS and columns <= TABLE_MAX_COLUMNS


def output_table(array: np.ndarray) -> Table:
    """A small rank-1 or rank-2 output: one row per record, one column per element, numbered."""
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("", style="dim", justify="right")
    for column in range(rows.shape[1]):
        table.add_column(str(column), justify="right")
    for index, row in enumerate(jsonable(rows)):
        table.add_row(str(index), *(_cell(value) for value in row))
    return table


def output_lines(array: np.ndarray) -> list[str]:
    """A scalar, or the first PREVIEW_ROWS rows of a larger output as one JSON list each, then a count."""
    values = jsonable(array)
    if array.ndim == 0:
        return [str(values)]
    lines = [json.dumps(row) for row in values[:PREVIEW_ROWS]]
    if len(values) > PREVIEW_ROWS:
        lines.append(f"... {len(values) - PREVIEW_ROWS} more rows (all of them: --output FILE or --json)")
    return lines


def output_heading(name: str, array: np.ndarray) -> str:
    """ "y: float32 [3, 3]"."""
    dtype = "string" if array.dtype.kind in ("O", "S") else array.dtype.name
    return f"{name}: {dtype} [{', '.join(str(d) for d in array.shape)}]"


# -- served models -------------------------------------------------------------------------------------------


def state_name(state: int) -> str:
    """AVAILABLE, LOADING... for a VersionState value."""
    return pb.VersionState.Name(state).removeprefix("VERSION_STATE_")


def policy_text(policy: pb.VersionPolicy) -> str:
    """ "latest 2", "versions 1, 3", "aliases production" (+ "all aliases")."""
    which = policy.WhichOneof("policy")
    if which == "specific":
        text = "versions " + ", ".join(str(v) for v in policy.specific.versions)
    elif which == "aliases":
        text = "aliases " + ", ".join(policy.aliases.aliases)
    else:
        text = f"latest {policy.latest or 1}"
    return text + (" + all aliases" if policy.all_aliases else "")


def served_models_table(models: Iterable[pb.ModelStatus]) -> Table:
    """One row per served version (one row for a model with none), with the policy and why anything failed."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("MODEL", "POLICY", "VERSION", "STATE", "ALIASES", "SINCE", "REASON"):
        table.add_column(header, overflow="fold")
    for model in models:
        if not model.versions:
            table.add_row(model.name, policy_text(model.policy), "-", "-", "", "", model.reason)
        for index, version in enumerate(model.versions):
            first = index == 0
            table.add_row(
                model.name if first else "",
                policy_text(model.policy) if first else "",
                str(version.version),
                state_name(version.state),
                ", ".join(version.aliases),
                timestamp_text(version.available_since),
                version.reason or (model.reason if first else ""),
            )
    return table


def served_model_detail(model: pb.ModelStatus) -> Table:
    """One served model: policy, versions and the signature of its newest available version."""
    versions = [
        f"{v.version} {state_name(v.state)}"
        + (f" ({', '.join(v.aliases)})" if v.aliases else "")
        + (f": {v.reason}" if v.reason else "")
        for v in model.versions
    ]
    return _details(
        [
            ("name", model.name),
            ("policy", policy_text(model.policy)),
            ("versions", "\n".join(versions) or "-"),
            ("inputs", "\n".join(tensor_text(spec) for spec in model.inputs)),
            ("outputs", "\n".join(tensor_text(spec) for spec in model.outputs)),
            ("reason", model.reason),
        ]
    )


# -- bulk jobs -----------------------------------------------------------------------------------------------


def job_state_name(state: int) -> str:
    """PENDING, RUNNING, SUCCEEDED... for a BatchJobState value."""
    return pb.BatchJobState.Name(state).removeprefix("BATCH_JOB_STATE_")


def _ref_text(ref) -> str:
    selector = ref.WhichOneof("selector")
    if selector == "version":
        return f"{ref.name}:{ref.version}"
    if selector == "alias":
        return f"{ref.name}@{ref.alias}"
    return ref.name


def job_detail(job: pb.BatchJob) -> Table:
    """Everything about one bulk job."""
    return _details(
        [
            ("id", job.id),
            ("state", job_state_name(job.state)),
            ("model", _ref_text(job.spec.model)),
            ("version", str(job.version or "")),
            ("records", f"{job.done_records}/{job.total_records}"),
            ("batch size", str(job.spec.batch_size or "")),
            ("outputs", ", ".join(job.spec.output_filter)),
            ("input", job.spec.input_digest),
            ("results", job.output_digest),
            ("error", job.error),
            ("instance", job.instance),
            ("created", timestamp_text(job.created_at)),
            ("updated", timestamp_text(job.updated_at)),
        ]
    )


def jobs_table(jobs: Iterable[pb.BatchJob]) -> Table:
    """One row per job, newest first as the predictor lists them."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("ID", "STATE", "MODEL", "VERSION", "RECORDS", "CREATED", "ERROR"):
        table.add_column(header, overflow="fold")
    for job in jobs:
        table.add_row(
            job.id,
            job_state_name(job.state),
            _ref_text(job.spec.model),
            str(job.version or ""),
            f"{job.done_records}/{job.total_records}",
            timestamp_text(job.created_at),
            job.error,
        )
    return table


@contextmanager
def job_progress(description: str) -> Iterator:
    """Shows a job's records on stderr; yields the (done, total) callback to feed while polling.

    On a terminal: a progress bar, removed if waiting fails. Otherwise: one line once the wait ended."""
    console = Console(stderr=True, highlight=False, markup=False)
    if not console.is_terminal:
        started, last = time.monotonic(), [0, 0]

        def remember(done: int, total: int) -> None:
            last[:] = [done, total]

        yield remember
        sys.stderr.write(f"{description}: {last[0]}/{last[1]} records in {time.monotonic() - started:.1f}s\n")
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        try:
            yield update
        except BaseException:
            progress.live.transient = True
            raise
