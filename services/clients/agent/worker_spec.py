"""The worker spec: one training job as every worker of its group receives it.

The trainer builds it without a single path (a *template*: `from_json(..., template=True)`), since its paths would
be of the trainer's host: the data set, the checkpoint to resume from and the SavedModel travel as registry blobs
(services.clients.agent.types.ReplicaData) and a file recipe travels as its source. The agent that runs a replica
sets the paths to directories of its own (`with_paths`), hands the spec to the worker process as a JSON file
(`to_json`), and the worker reads it back (`from_json`). A worker run by hand gets a spec with its paths.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DATASET_FORMATS = ("csv", "npz", "tfrecord")
OPTIMIZERS = ("adam", "sgd")
MAX_RECIPE_SOURCE_BYTES = 1024 * 1024
"""Largest file recipe a spec carries (its source travels in the spec)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where the examples are and how to read them."""

    format: str
    paths: tuple[str, ...] = ()
    """Local files; empty in a template (the agent sets the path of the data set blob in its cache)."""
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
    def from_dict(cls, raw: dict[str, Any], *, template: bool = False) -> "DatasetSpec":
        raw = dict(raw)
        _reject_unknown(raw, {f.name for f in dataclasses.fields(cls)} | {"path"}, "dataset")
        if template:
            if raw.pop("path", None) or raw.pop("paths", None):
                raise ValueError("dataset: a template names no path (the data set travels as a registry blob)")
            paths: list[str] = []
        else:
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
    checkpoint_dir: str = ""
    """This worker's own, on its host: backups (`backup/`: every worker restores `backup/chief`), the chief's
    snapshots for upload (`snapshots/`), shard records (`shards/`), attempt counters (`attempts/`). Empty in a
    template."""
    recipe_params: dict[str, Any] = field(default_factory=dict)
    recipes_dir: str | None = None
    """Where `file:` recipes are; None in a template (the agent writes `recipe_source` into a directory of its own
    and sets this to it)."""
    recipe_source: str = ""
    """Template only: the source of a `file:` recipe, as the trainer read it from its recipes directory."""
    epochs: int = 1
    batch_size: int = 32
    """Per replica; the global batch is batch_size x number of replicas."""
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    validation_split: float = 0.2
    checkpoint_every_steps: int = 50
    export_dir: str | None = None
    """Where the chief writes the SavedModel; no export when unset (in a template: the agent sets it)."""
    attempt: int = 0
    """The attempt of the job this worker belongs to (1 for the first); 0: counted in `checkpoint_dir/attempts`."""
    snapshot_checkpoint_every: int = 0
    """The chief copies every Nth backup it saves (and the one it saves when preempted) into
    `checkpoint_dir/snapshots/step-<step>` and announces it with a `checkpoint` progress event: its agent uploads
    it to the registry. 0: no snapshots."""
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
    def from_dict(cls, raw: dict[str, Any], *, template: bool = False) -> "WorkerSpec":
        """The spec of a worker (`template`: as the trainer sends it, without paths); ValueError naming the first
        problem."""
        raw = dict(raw)
        _reject_unknown(raw, {f.name for f in dataclasses.fields(cls)}, "spec")
        for name in ("recipe", "dataset") if template else ("recipe", "dataset", "checkpoint_dir"):
            if not raw.get(name):
                raise ValueError(f"spec: '{name}' is required")
        if not isinstance(raw["dataset"], dict):
            raise ValueError("spec: 'dataset' must be an object")
        spec = cls(**{**raw, "dataset": DatasetSpec.from_dict(raw["dataset"], template=template)})
        if template:
            named = [name for name in ("checkpoint_dir", "export_dir", "recipes_dir") if getattr(spec, name)]
            if named:
                raise ValueError(f"spec: a template names no path of the trainer's host, got {', '.join(named)}")
        elif spec.recipe_source:
            raise ValueError("spec: recipe_source belongs in a template (a worker reads recipes from recipes_dir)")
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str, *, template: bool = False) -> "WorkerSpec":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec: not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("spec: must be a JSON object")
        return cls.from_dict(raw, template=template)

    def with_paths(
        self, dataset_path: str, checkpoint_dir: str, export_dir: str, recipes_dir: str | None
    ) -> "WorkerSpec":
        """A template made runnable on one host (by its agent): its data set file and its own directories."""
        dataset = dataclasses.replace(self.dataset, paths=(dataset_path,))
        return dataclasses.replace(
            self,
            dataset=dataset,
            checkpoint_dir=checkpoint_dir,
            export_dir=export_dir,
            recipes_dir=recipes_dir,
            recipe_source="",
        )

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
        if self.attempt < 0 or self.snapshot_checkpoint_every < 0:
            raise ValueError("spec: attempt and snapshot_checkpoint_every must not be negative")


def _reject_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
