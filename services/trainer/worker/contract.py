"""The recipe contract: what a recipe module gives the training worker, for classification, regression and
multi-output models.

A recipe is a Python module: a built-in (`mlp`, `cnn`), a file in the trainer's recipes directory
(`recipe: file:<path>`), or a recipe registered in the registry by an ADMIN (`recipe: registry:<name>/<version>`).
Each worker imports it (tf-keras: `import tf_keras as keras`, the workers run with TF_USE_LEGACY_KERAS=1) and uses
these top-level names; only `build_model` is required:

`build_model(input_shape, num_outputs, **params) -> keras.Model` (required)
    The uncompiled model. `input_shape` is the shape of one example's features; `params` are the job's
    `recipe_params` (checked at submit against this function's keyword parameters, unless it takes `**params`).
    `num_outputs` (the second positional parameter, often named `num_classes`) is the number of classes for
    classification (`dataset.num_classes`, or the largest label + 1), and for regression the number of target
    values per example: 1 for a scalar label, k for a label vector of k values (NPZ `y` of shape [N, k], or a
    TFRecord float label of k values). A classifier with one output must output [batch, num_classes]
    probabilities (softmax); other models may have any outputs (several, named, for multi-output models) as long
    as the loss fits them.

`TASK = "classification" | "regression"` (optional; default "classification")
    How labels are read and which defaults apply. classification: integer labels (int64), loss sparse
    categorical cross-entropy, metric `accuracy`. regression: float labels (float32, a scalar or a vector per
    example), loss mean squared error, metrics `mse` and `mae`. The SavedModel's serving output is named
    `probabilities` (classification) or `predictions` (regression) for a single-output model, and by the model's
    output names for a multi-output one.

`loss() -> loss` (optional)
    What `model.compile(loss=...)` gets: a tf-keras loss object or name, or a dict/list of them for a
    multi-output model. Called inside the distribution strategy's scope.

`metrics() -> list | dict` (optional)
    What `model.compile(metrics=...)` gets (metric objects or names; per output as a dict for a multi-output
    model). Called inside the strategy's scope. Every metric is reported each epoch (`val_` for the validation
    split) and recorded with the trained version in the registry.

`preprocess(features, labels) -> (features, labels)` (optional)
    Applied to each example of the training and the validation split (a `tf.data` map: TensorFlow ops only, no
    Python side effects), before batching. For example: normalise features, or split a label vector into a dict
    keyed by the model's output names for a multi-output model.

`preprocess_batch(features, labels) -> (features, labels)` (optional)
    The same, applied to each batch (global batch size, before it is split between replicas).

The trainer checks at submit, without importing the module: it parses as Python, defines a top-level
`build_model`, `TASK` (if set) is one of the tasks, and `recipe_params` fit `build_model`. A worker checks the
rest when it imports the module; a failure there ends the job as an invalid spec (no restart).
"""

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
HOOKS = ("loss", "metrics", "preprocess", "preprocess_batch")
"""The optional functions a recipe module may define, besides build_model."""
SERVING_OUTPUT = {CLASSIFICATION: "probabilities", REGRESSION: "predictions"}
"""Name of a single-output model's output in its SavedModel's serving signature."""


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: build_model, the task, and the hooks it defines (None: the task's default)."""

    name: str
    build: Callable[..., Any]
    task: str = CLASSIFICATION
    loss: Callable[[], Any] | None = None
    metrics: Callable[[], Any] | None = None
    preprocess: Callable[[Any, Any], tuple[Any, Any]] | None = None
    preprocess_batch: Callable[[Any, Any], tuple[Any, Any]] | None = None

    @property
    def reshapes_labels(self) -> bool:
        """A preprocess hook may change what the outputs are compared with: the output shape is not checked."""
        return self.preprocess is not None or self.preprocess_batch is not None


def recipe_from_module(name: str, module: ModuleType) -> Recipe:
    """The recipe a module defines; ValueError naming what breaks the contract."""
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise ValueError(f"recipe: {name} defines no build_model(input_shape, num_outputs, **params)")
    task = getattr(module, "TASK", CLASSIFICATION)
    if task not in TASKS:
        raise ValueError(f"recipe: {name} sets TASK to {str(task)[:40]!r}; it must be one of {list(TASKS)}")
    hooks = {}
    for hook in HOOKS:
        value = getattr(module, hook, None)
        if value is not None and not callable(value):
            raise ValueError(f"recipe: {name}: {hook} must be a function")
        hooks[hook] = value
    return Recipe(name=name, build=build, task=task, **hooks)
