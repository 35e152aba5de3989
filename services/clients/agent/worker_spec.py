"""The worker spec: one training job as every worker of its group receives it. The trainer builds it, the agent
hands it to the worker process as a JSON file (`to_json`), and the worker reads it back (`from_json`)."""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DATASET_FORMATS = ("csv", "npz", "tfrecord")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class DatasetSpec:
    """Where the examples are and how to read them."""

    format: str
    paths: tuple[str, ...]
    feature_columns: tuple[str, ...] | None = None
    """CSV: the feature columns, in order; default every column but the label."""
    label_column: str = "label"
    """CSV: the integer label column."""
    features_key: str = "x"
    """NPZ: array of features [N, ...]; TFRecord: float feature of each tf.train.Example."""
    label_key: str = "y"
    """NPZ: array of integer labels [N]; TFRecord: int64 feature of each tf.train.Example."""
    num_classes: int | None = None
    """Default: the largest label + 1."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DatasetSpec":
        raw = dict(raw)
        _reject_unknown(raw, {f.name for f in dataclasses.fields(cls)} | {"path"}, "dataset")
        if ("path" in raw) == ("paths" in raw):
            raise ValueError("dataset: give exactly one of 'path' or 'paths'")
        paths = [raw.pop("path")] if "path" in raw else list(raw.pop("paths"))
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError("dataset: paths must be non-empty strings")
        if raw.get("format") not in DATASET_FORMATS:
            raise ValueError(f"dataset: format must be one of {', '.join(DATASET_FORMATS)}")
        if raw.get("feature_columns") is not None:
            raw["feature_columns"] = tuple(raw["feature_columns"])
        spec = cls(paths=tuple(paths), **raw)
        if spec.num_classes is not None and spec.num_classes < 2:
            raise ValueError("dataset: num_classes must be at least 2")
        return spec


@dataclass(frozen=True)
class WorkerSpec:
    """One training job as every worker of its group receives it."""

    recipe: str
    """A built-in recipe name (`mlp`, `cnn`) or `file:<path relative to recipes_dir>`."""
    dataset: DatasetSpec
    checkpoint_dir: str
    """Shared by the group: backups (`backup/`), shard records (`shards/`), attempt counters (`attempts/`)."""
    recipe_params: dict[str, Any] = field(default_factory=dict)
    recipes_dir: str | None = None
    epochs: int = 1
    batch_size: int = 32
    """Per replica; the global batch is batch_size x number of replicas."""
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    validation_split: float = 0.2
    checkpoint_every_steps: int = 50
    export_dir: str | None = None
    """Where the chief writes the SavedModel; no export when unset."""
    report_every_steps: int = 10
    seed: int = 0
    record_shard_ids: bool = False
    """Each worker records the example ids of its epoch-1 shard in `<checkpoint_dir>/shards/task-<i>.json`."""
    crash_at_step: int | None = None
    """Testing aid: task `crash_task` exits with code 3 after this global step, on its first attempt only."""
    crash_task: int = 0
    always_crash: bool = False
    """Testing aid: with crash_at_step, crash on every attempt."""
    step_delay_ms: int = 0
    """Testing aid: sleep this long after every step."""
    startup_timeout_s: float = 300.0
    """A worker still waiting for its peers after this long is ended by SIGALRM (exit status -14)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WorkerSpec":
        raw = dict(raw)
        _reject_unknown(raw, {f.name for f in dataclasses.fields(cls)}, "spec")
        for name in ("recipe", "dataset", "checkpoint_dir"):
            if not raw.get(name):
                raise ValueError(f"spec: '{name}' is required")
        if not isinstance(raw["dataset"], dict):
            raise ValueError("spec: 'dataset' must be an object")
        spec = cls(**{**raw, "dataset": DatasetSpec.from_dict(raw["dataset"])})
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec: not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("spec: must be a JSON object")
        return cls.from_dict(raw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def validate(self) -> None:
        """Raises ValueError naming the first field that is out of range."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "report_every_steps": self.report_every_steps}
        positive["checkpoint_every_steps"] = self.checkpoint_every_steps
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"spec: {name} must be a positive integer")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError("spec: validation_split must be in [0, 1)")
        if not self.learning_rate > 0:
            raise ValueError("spec: learning_rate must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"spec: optimizer must be one of {', '.join(OPTIMIZERS)}")
        if not isinstance(self.recipe_params, dict):
            raise ValueError("spec: recipe_params must be an object")
        if self.crash_at_step is not None and self.crash_at_step < 1:
            raise ValueError("spec: crash_at_step must be a positive integer")
        if not self.startup_timeout_s > 0:
            raise ValueError("spec: startup_timeout_s must be positive")
        if self.step_delay_ms < 0:
            raise ValueError("spec: step_delay_ms must not be negative")


def _reject_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
