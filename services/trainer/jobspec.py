"""What a job asks for, as submitted: the JobSpec and its data set and hyper-parameters.

The fields mirror modelgrid.trainer.v1.JobSpec, with its meaning of zero: a zero (or empty) field is unset and takes
a default, so that a job returns its spec exactly as it was submitted. `HyperParameters.or_defaults()` and the
trainer's settings supply the defaults where the values are used. Stored in Redis through `spec_to_dict` and
`spec_from_dict`.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Dataset:
    """Where the training data is and how to read it."""

    format: str = ""
    """"csv", "npz" or "tfrecord"."""
    blob_digest: str = ""
    """sha256 of a blob in the registry's blob store; or else:"""
    local_path: str = ""
    """a file on the trainer's own host (single-host setups): the trainer uploads it to the registry at submit, and
    the agents only ever get its digest."""
    feature_columns: tuple[str, ...] = ()
    """CSV: feature columns (empty: every column but the label)."""
    label_column: str = ""
    """CSV: label column (empty: "label")."""
    features_key: str = ""
    """NPZ / TFRecord: key of the features (empty: "x")."""
    label_key: str = ""
    """NPZ / TFRecord: key of the labels (empty: "y")."""
    num_classes: int = 0
    """0: derived from the labels. Classification only: a regression recipe (TASK = "regression") reads float labels
    and gets the width of a label as its number of outputs."""


@dataclass(frozen=True)
class HyperParameters:
    """Optimisation settings; zero means the default (see DEFAULT_HYPER_PARAMETERS)."""

    epochs: int = 0
    batch_size: int = 0
    """Examples per replica per step; the global batch is this times the number of workers."""
    learning_rate: float = 0.0
    optimizer: str = ""
    """"adam" or "sgd"."""
    validation_split: float = 0.0
    """Share of the data held out for validation."""
    seed: int = 0

    def or_defaults(self) -> "HyperParameters":
        """These settings with every unset (zero) one replaced by its default."""
        defaults = DEFAULT_HYPER_PARAMETERS
        return HyperParameters(
            **{f.name: getattr(self, f.name) or getattr(defaults, f.name) for f in dataclasses.fields(self)}
        )


DEFAULT_HYPER_PARAMETERS = HyperParameters(
    epochs=1, batch_size=32, learning_rate=1e-3, optimizer="adam", validation_split=0.2, seed=0
)
"""What a job gets for the hyper-parameters it does not set (the workers' own defaults)."""


@dataclass(frozen=True)
class JobSpec:
    """What to train and how, as submitted."""

    name: str = ""
    """Display name."""
    recipe: str = ""
    """Built-in recipe ("mlp", "cnn"), "file:<path inside the trainer's recipes directory>", or
    "registry:<name>/<version>" (a recipe an ADMIN registered in the registry)."""
    recipe_params: dict[str, Any] = field(default_factory=dict)
    """Recipe parameters (JSON values), e.g. {"hidden_units": [64, 32]}."""
    dataset: Dataset = field(default_factory=Dataset)
    hyper_parameters: HyperParameters = field(default_factory=HyperParameters)
    workers: int = 0
    """Worker processes (one replica each)."""
    checkpoint_every_steps: int = 0
    """0: the trainer's default."""
    max_restarts: int | None = None
    """Restarts allowed after failures (preemptions do not count); None: the trainer's default, 0: none."""
    register_model: str = ""
    """Registry model to register the result into (empty: do not register)."""
    register_aliases: tuple[str, ...] = ()
    """Aliases to point at the registered version."""
    report_every_steps: int = 0
    """Progress events every N steps (0: the trainer's default)."""
    step_delay_ms: int = 0
    """Testing aid: pause per step."""
    hang_timeout_seconds: float = 0.0
    """No step progress for this long kills the group (0: the trainer's default)."""


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec as JSON-ready data (what the job store writes)."""
    return dataclasses.asdict(spec)


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    """The spec of `spec_to_dict`'s data. Missing fields are unset, so jobs stored before JobSpec existed (the
    protobuf JSON mapping with proto field names, which leaves unset fields out) read the same way."""
    values = _known(JobSpec, data)
    dataset = _known(Dataset, values.pop("dataset", None) or {})
    dataset["feature_columns"] = tuple(dataset.get("feature_columns") or ())
    hyper_parameters = _known(HyperParameters, values.pop("hyper_parameters", None) or {})
    values["register_aliases"] = tuple(values.get("register_aliases") or ())
    return JobSpec(**values, dataset=Dataset(**dataset), hyper_parameters=HyperParameters(**hyper_parameters))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}
