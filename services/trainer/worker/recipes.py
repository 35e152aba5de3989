"""Model recipes: the built-in `mlp` and `cnn`, and user modules loaded from the configured recipes directory.

What a recipe module provides is the contract in services/trainer/worker/contract.py (build_model, and optional
TASK, loss, metrics and input-pipeline hooks). The built-ins are classifiers:
`build_model(input_shape, num_classes, **params) -> tf.keras.Model` (tf-keras, TF_USE_LEGACY_KERAS=1) whose output
is the class probabilities (softmax), shape [batch, num_classes]. A user recipe is named
`file:<path relative to recipes_dir>`; the path is resolved (symlinks included) and refused unless it stays
inside recipes_dir (`resolve_recipe_file`, which lives in the package so that the trainer can check a spec
without importing TensorFlow). A registry recipe reaches the worker the same way: the trainer sends its source and
the agent writes it into the replica's recipes directory.
"""

import hashlib
import importlib.util
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tf_keras as keras

from services.trainer.worker import FILE_PREFIX, resolve_recipe_file
from services.trainer.worker.contract import CLASSIFICATION, Recipe, recipe_from_module

logger = logging.getLogger(__name__)


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    hidden_units: Sequence[int] = (64,),
    dropout: float = 0.0,
    activation: str = "relu",
) -> keras.Model:
    """Dense layers on the flattened input."""
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    h = keras.layers.Flatten()(inputs)
    for units in hidden_units:
        h = keras.layers.Dense(int(units), activation=activation)(h)
        if dropout:
            h = keras.layers.Dropout(float(dropout))(h)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(h)
    return keras.Model(inputs, outputs, name="mlp")


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    filters: Sequence[int] = (16, 32),
    kernel_size: int = 3,
    dense_units: int = 64,
    dropout: float = 0.0,
    image_shape: Sequence[int] | None = None,
) -> keras.Model:
    """Conv+pool blocks, then a dense layer. A flat square input (64 = 8x8) is reshaped to an image."""
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    shape = tuple(image_shape) if image_shape else _image_shape(tuple(input_shape))
    h = keras.layers.Reshape(shape)(inputs) if shape != tuple(input_shape) else inputs
    for n in filters:
        h = keras.layers.Conv2D(int(n), kernel_size, padding="same", activation="relu")(h)
        if h.shape[1] >= 2 and h.shape[2] >= 2:
            h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(int(dense_units), activation="relu")(h)
    if dropout:
        h = keras.layers.Dropout(float(dropout))(h)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(h)
    return keras.Model(inputs, outputs, name="cnn")


BUILTIN_RECIPES: dict[str, Callable[..., keras.Model]] = {"mlp": mlp, "cnn": cnn}


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(input_shape) == 3:
        return input_shape
    if len(input_shape) == 2:
        return (*input_shape, 1)
    side = math.isqrt(input_shape[0]) if len(input_shape) == 1 else 0
    if side * side != (input_shape[0] if len(input_shape) == 1 else -1):
        raise ValueError(f"cnn: cannot treat input shape {input_shape} as an image; pass recipe_params.image_shape")
    return (side, side, 1)


def load(name: str, recipes_dir: str | Path | None = None) -> Recipe:
    """A built-in recipe by name, or the recipe of the module at `file:<relative path>` in recipes_dir."""
    if not name.startswith(FILE_PREFIX):
        try:
            return Recipe(name=name, build=BUILTIN_RECIPES[name], task=CLASSIFICATION)
        except KeyError:
            known = ", ".join(sorted(BUILTIN_RECIPES))
            raise ValueError(f"recipe: unknown built-in {name!r} (known: {known}; or file:<path>)") from None
    path = resolve_recipe_file(name[len(FILE_PREFIX) :], recipes_dir)
    module_name = "modelgrid_recipe_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"recipe: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's module: any failure to import it is a property of the recipe
        raise ValueError(f"recipe: importing {name} failed: {exc!r}") from exc
    recipe = recipe_from_module(name, module)
    logger.info("loaded recipe %s (%s) from %s", name, recipe.task, path)
    return recipe


def load_recipe(name: str, recipes_dir: str | Path | None = None) -> Callable[..., keras.Model]:
    """The build_model function of a recipe (see `load`)."""
    return load(name, recipes_dir).build


def build_model(
    name: str | Recipe,
    input_shape: Sequence[int],
    num_outputs: int,
    params: dict[str, Any],
    recipes_dir: str | None = None,
) -> keras.Model:
    """Loads the recipe (unless given one) and builds its model, checking the parameters and what the recipe
    returns: a tf-keras Model, and for a single-output classifier whose labels no hook reshapes, an output of
    [batch, num_outputs]."""
    recipe = name if isinstance(name, Recipe) else load(name, recipes_dir)
    name = recipe.name
    try:
        inspect.signature(recipe.build).bind(tuple(input_shape), num_outputs, **params)
    except TypeError as exc:
        raise ValueError(f"recipe {name}: bad recipe_params: {exc}") from None
    try:
        model = recipe.build(tuple(input_shape), num_outputs, **params)
    except Exception as exc:
        raise ValueError(f"recipe {name}: build_model failed: {exc!r}") from exc
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"recipe {name}: build_model returned {type(model).__name__}, not a tf-keras Model "
            "(use tf.keras with TF_USE_LEGACY_KERAS=1, or import tf_keras)"
        )
    single = len(model.outputs) == 1
    if single and not recipe.reshapes_labels:  # hooks may reshape the labels: then the fit checks the shapes
        shape = tuple(model.output_shape[1:])
        fits = shape == (num_outputs,) or (recipe.task != CLASSIFICATION and num_outputs == 1 and shape == ())
        if not fits:  # a regression output narrower than its targets would broadcast in the loss, silently
            raise ValueError(f"recipe {name}: output shape {model.output_shape} is not [batch, {num_outputs}]")
    return model
