"""Example user recipe: a small MLP with dropout, used in a job spec as `recipe: file:small_mlp.py`.

This directory is the trainer's recipes directory under `make up` (MODELGRID_TRAINER_RECIPES_DIR); the trainer
accepts `file:<path>` recipes only from inside it, and each worker imports the module by its path. A recipe module
defines `build_model(input_shape, num_classes, **params)`, where `params` are the job's `recipe_params`, and returns
an uncompiled tf-keras Model (import tf_keras, not keras: the workers run with TF_USE_LEGACY_KERAS=1) whose output
is the class probabilities, shape [batch, num_classes]. The worker compiles it with the job's optimizer, trains it
under MultiWorkerMirroredStrategy and exports it as a SavedModel. The whole recipe contract (regression and
multi-output models, the loss, metrics and input-pipeline hooks) is in services/trainer/worker/contract.py.

    recipe: file:small_mlp.py
    recipe_params: {hidden_units: [128, 64], dropout: 0.1}
"""

import logging
from collections.abc import Sequence

import tf_keras as keras

logger = logging.getLogger(__name__)


def build_model(
    input_shape: Sequence[int], num_classes: int, hidden_units: Sequence[int] = (128, 64), dropout: float = 0.1
) -> keras.Model:
    """Flatten, then Dense+ReLU (+Dropout) layers of `hidden_units`, then a softmax over the classes."""
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    h = keras.layers.Flatten()(inputs)
    for units in hidden_units:
        h = keras.layers.Dense(int(units), activation="relu")(h)
        if dropout:
            h = keras.layers.Dropout(float(dropout))(h)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(h)
    return keras.Model(inputs, outputs, name="small_mlp")
