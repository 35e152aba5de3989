"""Progress events: what a training worker reports, one JSON object per line of its progress file.

The worker writes them (`event.to_json()`), its agent relays each line as it is, and the trainer's runner reads
them back (`ProgressEvent.from_json(line)`). Every line has "event" (the kind) and "time" (unix seconds); in the
order a worker writes them:

  shard      task, num_examples, example_ids_digest, policy  (with record_shard_ids; epoch 1 of this worker)
  started    task, workers, attempt, initial_step (global step restored from the backup, 0 if none),
             steps_per_epoch, epochs
  step       step (global, after the step), epoch (1-based), metrics (loss and the recipe's metrics, e.g. accuracy;
             mse, mae for regression)
  epoch      epoch, metrics (the same, with their val_ twins: val_loss, val_accuracy...)
  checkpoint step, path (a snapshot of the backup saved at that step, for the agent to upload)  (chief only, every
             snapshot_checkpoint_every-th backup and the preemption's)
  preempted  task, step (the global step saved; null outside fit: resume from the last backup), then exit 42
  exported   path, metrics (the last epoch's, and steps)  (chief only; the agent uploads it)
  finished   task, step
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """One progress line; the subclasses are the kinds."""

    KIND: ClassVar[str] = ""
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        """The line (without its newline)."""
        data = dataclasses.asdict(self)
        data["time"] = round(self.time, 3)
        return json.dumps({"event": self.KIND, **data})

    @staticmethod
    def from_json(text: str) -> "ProgressEvent":
        """The event of one line; ValueError for a line that is not one (unknown fields are ignored)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a progress line must be a JSON object")
        kind = _KINDS.get(data.get("event"))
        if kind is None:
            raise ValueError(f"unknown progress event {data.get('event')!r}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(kind):
            if f.name in data:
                values[f.name] = _checked(kind.KIND, f.name, data[f.name], f.type)
        try:
            return kind(**values)
        except TypeError as exc:
            raise ValueError(f"progress event {kind.KIND!r}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Shard(ProgressEvent):
    """The examples a worker read in epoch 1 (with record_shard_ids)."""

    KIND: ClassVar[str] = "shard"
    task: int
    num_examples: int
    example_ids_digest: str
    policy: str


@dataclass(frozen=True, kw_only=True)
class Started(ProgressEvent):
    """A worker joined its group and starts training."""

    KIND: ClassVar[str] = "started"
    task: int
    workers: int
    attempt: int
    initial_step: int = 0
    """The global step restored from the backup (0 if none)."""
    steps_per_epoch: int = 0
    epochs: int = 0


@dataclass(frozen=True, kw_only=True)
class Step(ProgressEvent):
    """Every report_every_steps global steps: batch metrics."""

    KIND: ClassVar[str] = "step"
    step: int
    epoch: int = 0
    """1-based; 0 when not known."""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Epoch(ProgressEvent):
    """The end of an epoch: epoch metrics."""

    KIND: ClassVar[str] = "epoch"
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(ProgressEvent):
    """The chief saved a backup at `step` and copied it into `path` (in its checkpoint dir's `snapshots/`): its agent
    uploads that copy to the registry, then removes it."""

    KIND: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True, kw_only=True)
class Preempted(ProgressEvent):
    """SIGTERM: the group saved at `step` and the worker exits 42."""

    KIND: ClassVar[str] = "preempted"
    task: int
    step: int | None = None
    """The global step saved; None outside fit (resume from the last backup)."""


@dataclass(frozen=True, kw_only=True)
class Exported(ProgressEvent):
    """The chief wrote the SavedModel."""

    KIND: ClassVar[str] = "exported"
    path: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Finished(ProgressEvent):
    """Training is over for this worker."""

    KIND: ClassVar[str] = "finished"
    task: int
    step: int


_KINDS: dict[Any, type[ProgressEvent]] = {
    k.KIND: k for k in (Shard, Started, Step, Epoch, CheckpointSaved, Preempted, Exported, Finished)
}


def _checked(kind: str, name: str, value: Any, annotation: Any) -> Any:
    """The value of one field as its type says: numbers as int or float, metrics as numbers only."""
    if name == "metrics":
        if not isinstance(value, dict):
            raise ValueError(f"progress event {kind!r}: metrics must be an object")
        return {k: float(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if value is None and annotation == (int | None):
        return None
    base = int if annotation == (int | None) else annotation
    if base in (int, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"progress event {kind!r}: {name} must be a number, got {value!r}")
        return base(value)
    if base is str and not isinstance(value, str):
        raise ValueError(f"progress event {kind!r}: {name} must be a string, got {value!r}")
    return value
