"""Example regression recipe: an MLP that predicts one or more real-valued targets (mean squared error).

Register it in the registry (ADMIN key), then name it in a job spec (examples/regression-mlp.yaml):

    modelgrid recipes register regression-mlp examples/recipes/regression_mlp.py
    recipe: registry:regression-mlp/1
    recipe_params: {hidden_units: [32, 32]}

It follows the recipe contract (services/trainer/worker/contract.py): TASK = "regression" makes the workers read
float labels and default to the mse loss and the mse and mae metrics; `num_outputs` is the number of targets per
example (1 for a scalar label). It also shows the optional hooks: `metrics` adds a root mean squared error, and
`preprocess` clips outlying targets.
"""

from collections.abc import Sequence

import tensorflow as tf
import tf_keras as keras

TASK = "regression"


def build_model(input_shape: Sequence[int], num_outputs: int, hidden_units: Sequence[int] = (32, 32)) -> keras.Model:
    """Dense+ReLU layers of `hidden_units`, then a linear output of `num_outputs` values."""
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    h = keras.layers.Flatten()(inputs)
    for units in hidden_units:
        h = keras.layers.Dense(int(units), activation="relu")(h)
    outputs = keras.layers.Dense(num_outputs, name="predictions")(h)
    return keras.Model(inputs, outputs, name="regression_mlp")


def loss():
    """The default for regression, spelled out: mean squared error."""
    return keras.losses.MeanSquaredError()


def metrics():
    """Reported per epoch (val_mse, val_mae, val_rmse) and recorded with the trained version."""
    return [
        keras.metrics.MeanSquaredError(name="mse"),
        keras.metrics.MeanAbsoluteError(name="mae"),
        keras.metrics.RootMeanSquaredError(name="rmse"),
    ]


def preprocess(features, labels):
    """Per example, in the tf.data pipeline: targets clipped to +-20 (the shipped data set has none beyond)."""
    return features, tf.clip_by_value(labels, -20.0, 20.0)
