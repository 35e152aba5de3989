"""Example multi-output recipe: one shared trunk and two named regression heads, one per target.

For a data set whose label is a vector of two targets (data/regression/regression.npz, label_key y2): the
`preprocess` hook splits each label vector into a dict keyed by the model's output names, and `loss` and `metrics`
are given per output. See examples/regression-two-targets.yaml and services/trainer/worker/contract.py.

    modelgrid recipes register two-targets examples/recipes/two_targets.py
    recipe: registry:two-targets/1
"""

from collections.abc import Sequence

import tf_keras as keras

TASK = "regression"
HEADS = ("first", "second")


def build_model(input_shape: Sequence[int], num_outputs: int, trunk_units: int = 32) -> keras.Model:
    """A shared Dense trunk, then one linear unit per head (the data set must have one target per head)."""
    if num_outputs != len(HEADS):
        raise ValueError(f"two_targets needs labels of {len(HEADS)} targets, the data set has {num_outputs}")
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    h = keras.layers.Dense(int(trunk_units), activation="relu")(inputs)
    h = keras.layers.Dense(int(trunk_units), activation="relu")(h)
    outputs = {name: keras.layers.Dense(1, name=name)(h) for name in HEADS}
    return keras.Model(inputs, outputs, name="two_targets")


def loss():
    return {name: keras.losses.MeanSquaredError() for name in HEADS}


def metrics():
    return {name: [keras.metrics.MeanAbsoluteError(name="mae")] for name in HEADS}


def preprocess(features, labels):
    """labels [2] -> {"first": [1], "second": [1]}, matching the heads' outputs."""
    return features, {name: labels[i : i + 1] for i, name in enumerate(HEADS)}
