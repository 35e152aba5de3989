"""How training jobs look: tables of jobs and workers, one job in detail, and a job followed event by event.

`JobWatch` folds a job's events into what the live display shows (state, attempt, epoch, step, metrics, restarts,
registered version); `event_line` is the one line per event printed when the output is not a terminal.
"""

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from modelgrid.trainer.v1 import trainer_pb2 as pb
from services.cli.registry_views import _details, _table, timestamp_text

logger = logging.getLogger(__name__)

METRIC_ORDER = ("loss", "accuracy", "val_loss", "val_accuracy")
"""Metrics shown first, in this order; any others follow by name."""
FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def state_name(state: int) -> str:
    """PENDING, RUNNING, SUCCEEDED... for a JobState value."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


def metrics_text(metrics: Mapping[str, float]) -> str:
    """ "loss 0.2731  accuracy 0.9312  val_loss ..." (loss and accuracy first, then val_*, then the rest)."""
    names = [n for n in METRIC_ORDER if n in metrics] + sorted(set(metrics) - set(METRIC_ORDER))
    return "  ".join(f"{name} {_number(name, metrics[name])}" for name in names)


def _number(name: str, value: float) -> str:
    """Four decimals, but counts (such as the steps an export reports) as integers."""
    return str(int(value)) if name not in METRIC_ORDER and value.is_integer() else f"{value:.4f}"


def failure_text(failure: pb.Failure) -> str:
    """ "worker 1 exited with signal 9 (task 1 on agent-x, exit code -9)"; empty when there is no failure."""
    if not failure.reason and failure.exit_code == 0:
        return ""
    where = []
    if failure.agent:
        where.append(f"task {failure.task_index} on {failure.agent}")
    if failure.exit_code:
        where.append(f"exit code {failure.exit_code}")
    return failure.reason + (f" ({', '.join(where)})" if where else "")


def _epochs(spec: pb.JobSpec) -> int:
    return spec.hyper_parameters.epochs or 1  # the workers' default


def _registered(job: pb.Job) -> str:
    return f"{job.spec.register_model}:{job.registered_version}" if job.registered_version else ""


def compact_json(message) -> str:
    """A protobuf message as one line of JSON (for --json streams: one object per line)."""
    return json_format.MessageToJson(message, indent=None, sort_keys=True)


# -- tables and details --------------------------------------------------------------------------------------


def jobs_table(jobs: Iterable[pb.Job]) -> Table:
    """One row per job, newest first as the trainer lists them."""
    table = _table("ID", "NAME", "STATE", "RECIPE", "WORKERS", "EPOCH", "STEP", "VAL_ACCURACY", "MODEL", "CREATED")
    for job in jobs:
        accuracy = job.metrics.get("val_accuracy")
        table.add_row(
            job.id,
            job.spec.name,
            state_name(job.state),
            job.spec.recipe,
            str(job.spec.workers),
            f"{job.epoch}/{_epochs(job.spec)}",
            str(job.step),
            "" if accuracy is None else f"{accuracy:.4f}",
            _registered(job) or job.spec.register_model,
            timestamp_text(job.created_at),
        )
    return table


def _dataset_text(dataset: pb.Dataset) -> str:
    source = dataset.WhichOneof("source")
    where = f"blob {dataset.blob_digest}" if source == "blob_digest" else dataset.local_path
    keys = [dataset.features_key, dataset.label_key] if dataset.format != "csv" else [dataset.label_column]
    keys = [k for k in keys if k]
    classes = f", {dataset.num_classes} classes" if dataset.num_classes else ""
    return f"{where} ({dataset.format}{': ' + ', '.join(keys) if keys else ''}{classes})"


def _hyper_parameters_text(hp: pb.HyperParameters) -> str:
    parts = [
        f"epochs {hp.epochs or 1}",
        f"batch {hp.batch_size or 32}",
        f"lr {hp.learning_rate or 1e-3:g}",
        hp.optimizer or "adam",
        f"validation {hp.validation_split:g}",
        f"seed {hp.seed}",
    ]
    return ", ".join(parts)


def _params_text(params) -> str:
    """ "hidden_units=[64, 32]": Struct numbers are doubles; whole ones print as integers."""
    values = json_format.MessageToDict(params)
    return ", ".join(f"{key}={json.dumps(_whole(values[key]))}" for key in sorted(values))


def _whole(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    return value


def job_detail(job: pb.Job) -> Table:
    """Everything about one job: its spec in short, where it runs, how far it got, what failed."""
    spec = job.spec
    placements = [f"task {p.task_index}: {p.agent} ({p.address})" for p in job.placements]
    register = spec.register_model + (f" @ {', '.join(spec.register_aliases)}" if spec.register_aliases else "")
    return _details(
        [
            ("id", job.id),
            ("name", spec.name),
            ("state", state_name(job.state)),
            ("message", job.message),
            ("recipe", spec.recipe + (f" ({_params_text(spec.recipe_params)})" if spec.recipe_params.fields else "")),
            ("dataset", _dataset_text(spec.dataset)),
            ("dataset digest", job.dataset_digest),
            ("training", _hyper_parameters_text(spec.hyper_parameters)),
            ("workers", str(spec.workers)),
            ("placements", "\n".join(placements)),
            ("attempt", str(job.attempt)),
            (
                "restarts",
                f"{job.restarts} (budget {spec.max_restarts or 'the default'}), {job.preemptions} preemptions",
            ),
            ("progress", f"epoch {job.epoch}/{_epochs(spec)}, step {job.step}"),
            ("checkpoint", _checkpoint_text(job)),
            ("metrics", metrics_text(job.metrics)),
            ("failure", failure_text(job.failure)),
            ("register", register),
            ("registered", _registered(job)),
            ("request id", job.request_id),
            ("created", timestamp_text(job.created_at)),
            ("updated", timestamp_text(job.updated_at)),
        ]
    )


def _checkpoint_text(job: pb.Job) -> str:
    """The newest checkpoint in the registry, which a restart resumes from ("" before the first)."""
    if not job.HasField("checkpoint"):
        return ""
    checkpoint = job.checkpoint
    return f"step {checkpoint.step} (attempt {checkpoint.attempt}), blob {checkpoint.digest[:12]}"


def workers_table(workers: Iterable[pb.Worker]) -> Table:
    """One row per healthy agent: its slots, how many jobs take, and which jobs."""
    table = _table("ID", "HOST", "ADDRESS", "SLOTS", "USED", "JOBS")
    for worker in workers:
        table.add_row(
            worker.id, worker.host, worker.address, str(worker.slots), str(worker.used_slots), ", ".join(worker.jobs)
        )
    return table


# -- following a job -----------------------------------------------------------------------------------------


def _clock(ts: Timestamp) -> str:
    """Local time of day of an event, "14:03:27"."""
    if not ts.seconds and not ts.nanos:
        return "--:--:--"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S")


@dataclass
class Restart:
    """One restart: the attempt that failed, why, and where training resumed."""

    attempt: int
    cause: str
    resume_step: int
    recovery_seconds: float | None = None

    def text(self) -> str:
        resumed = f", resumed after {self.recovery_seconds:.1f}s" if self.recovery_seconds is not None else ""
        return f"attempt {self.attempt}: {self.cause}; resuming from step {self.resume_step}{resumed}"


@dataclass
class JobWatch:
    """A job as its events describe it so far."""

    job_id: str
    spec: pb.JobSpec
    state: int = pb.JOB_STATE_UNSPECIFIED
    attempt: int = 0
    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    restarts: list[Restart] = field(default_factory=list)
    version: int = 0
    message: str = ""

    @classmethod
    def of(cls, job: pb.Job) -> "JobWatch":
        return cls(job.id, job.spec)

    @property
    def epochs(self) -> int:
        return _epochs(self.spec)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def update(self, event: pb.JobEvent) -> None:
        self.state, self.attempt = event.state, event.attempt
        if event.type in (pb.JOB_EVENT_TYPE_STEP, pb.JOB_EVENT_TYPE_EPOCH):
            self.epoch, self.step = event.epoch, event.step
            self.metrics.update(event.metrics)
        elif event.type == pb.JOB_EVENT_TYPE_RESTART:
            self.restarts.append(Restart(event.attempt, failure_text(event.failure) or event.message, event.step))
        elif event.type == pb.JOB_EVENT_TYPE_RESUMED and self.restarts:
            self.restarts[-1].recovery_seconds = event.recovery_seconds
            self.step = event.step
        elif event.type == pb.JOB_EVENT_TYPE_REGISTERED:
            self.version = event.version
        if event.message:
            self.message = event.message

    def renderable(self) -> RenderableType:
        """What the live display shows."""
        head = Table.grid(padding=(0, 2))
        for _ in range(4):
            head.add_column()
        name = self.spec.name or self.spec.recipe
        head.add_row(
            Text(f"job {self.job_id}", style="bold"),
            name,
            Text(state_name(self.state), style="bold"),
            f"attempt {self.attempt}",
        )
        progress = Table.grid(padding=(0, 2))
        progress.add_column(no_wrap=True)
        progress.add_column(width=30)
        progress.add_column(no_wrap=True)
        bar = ProgressBar(total=self.epochs, completed=min(self.epoch, self.epochs))
        progress.add_row(f"epoch {self.epoch}/{self.epochs}", bar, f"step {self.step}")
        lines: list[RenderableType] = [head, progress]
        if self.metrics:
            lines.append(metrics_text(self.metrics))
        lines += [Text(f"restart {i}: {r.text()}", style="yellow") for i, r in enumerate(self.restarts, 1)]
        if self.version:
            lines.append(Text(f"registered {self.spec.register_model}:{self.version}", style="green"))
        if self.message:
            lines.append(Text(self.message, style="dim"))
        return Group(*lines)

    def summary(self) -> str:
        """The last line: "job ID SUCCEEDED: registered digits:3 (val_accuracy 0.9375 ...)"."""
        text = f"job {self.job_id} {state_name(self.state)}"
        if self.version:
            text += f": registered {self.spec.register_model}:{self.version}"
        if self.metrics:
            text += f" ({metrics_text(self.metrics)})"
        return text


def event_line(event: pb.JobEvent, watch: JobWatch) -> str:
    """One event as one line (output that is not a terminal); `watch` has already taken the event in."""
    when, kind = _clock(event.time), event.type
    if kind == pb.JOB_EVENT_TYPE_STEP:  # batch metrics only: the val_* it carries are the last epoch's
        batch = {name: value for name, value in event.metrics.items() if not name.startswith("val_")}
        return f"{when} step {event.step}  epoch {event.epoch}/{watch.epochs}  {metrics_text(batch)}"
    if kind == pb.JOB_EVENT_TYPE_EPOCH:
        return f"{when} epoch {event.epoch}/{watch.epochs} done at step {event.step}  {metrics_text(event.metrics)}"
    if kind == pb.JOB_EVENT_TYPE_RESTART:
        cause = failure_text(event.failure) or event.message
        return f"{when} RESTART after attempt {event.attempt}: {cause}; resuming from step {event.step}"
    if kind == pb.JOB_EVENT_TYPE_RESUMED:
        return f"{when} resumed at step {event.step} after {event.recovery_seconds:.1f}s (attempt {event.attempt})"
    if kind == pb.JOB_EVENT_TYPE_REGISTERED:
        return f"{when} registered {watch.spec.register_model}:{event.version}"
    failure = failure_text(event.failure) if event.state == pb.JOB_STATE_FAILED else ""
    message = event.message + (f" ({failure})" if failure and failure not in event.message else "")
    return f"{when} {state_name(event.state)} (attempt {event.attempt}): {message}"
