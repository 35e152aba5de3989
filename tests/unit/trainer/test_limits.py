"""Job spec bounds, checked at submit without TensorFlow (pure logic: no servers): every number within the trainer's
limits, finite, and recipe parameters as the recipe declares them."""

import inspect
import math

import pytest

from modelgrid.client.errors import InvalidArgument
from services.trainer.jobspec import Dataset, HyperParameters, JobSpec
from services.trainer.limits import BUILTIN_RECIPE_PARAMS, check_recipe_params
from services.trainer.settings import TrainerSettings
from services.trainer.specs import check_shape

SETTINGS = TrainerSettings(consul_enabled=False)


def spec(**fields) -> JobSpec:
    values = {
        "recipe": "mlp",
        "dataset": Dataset(format="npz", blob_digest="ab" * 32),
        "workers": 1,
        **fields,
    }
    return JobSpec(**values)


def test_a_sane_spec_passes():
    check_shape(spec(recipe_params={"hidden_units": [128, 64], "dropout": 0.1}), SETTINGS)
    check_shape(spec(recipe="cnn", recipe_params={"filters": [8.0, 16.0], "image_shape": [8, 8, 1]}), SETTINGS)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"hyper_parameters": HyperParameters(learning_rate=math.nan)}, "learning_rate must be a finite number"),
        ({"hyper_parameters": HyperParameters(learning_rate=math.inf)}, "learning_rate must be a finite"),
        ({"hyper_parameters": HyperParameters(learning_rate=-1.0)}, "learning_rate must be between"),
        ({"hyper_parameters": HyperParameters(epochs=2**31)}, "MODELGRID_TRAINER_MAX_EPOCHS"),
        ({"hyper_parameters": HyperParameters(epochs=-3)}, "epochs must be between 1"),
        ({"hyper_parameters": HyperParameters(batch_size=2**31)}, "MODELGRID_TRAINER_MAX_BATCH_SIZE"),
        ({"hyper_parameters": HyperParameters(validation_split=math.nan)}, "validation_split must be a finite"),
        ({"hyper_parameters": HyperParameters(seed=2**40)}, "seed must be between"),
        ({"dataset": Dataset(format="npz", blob_digest="ab" * 32, num_classes=-1)}, "num_classes must be between"),
        ({"dataset": Dataset(format="npz", blob_digest="ab" * 32, num_classes=2**31)}, "MAX_NUM_CLASSES"),
        ({"dataset": Dataset(format="npz", blob_digest="ab" * 32, num_classes=1)}, "at least 2"),
        ({"dataset": Dataset(format="csv", blob_digest="ab" * 32, label_column="x" * 300)}, "at most 256"),
        ({"max_restarts": 10**6}, "MODELGRID_TRAINER_MAX_RESTARTS_LIMIT"),
        ({"checkpoint_every_steps": -1}, "checkpoint_every_steps must be between 0"),
        ({"report_every_steps": 2**62}, "MODELGRID_TRAINER_MAX_STEPS_INTERVAL"),
        ({"hang_timeout_seconds": math.inf}, "hang_timeout_seconds must be a finite"),
        ({"step_delay_ms": 10**9}, "step_delay_ms must be between"),
        ({"name": "n" * 1000}, "name is longer than 256"),
        ({"register_model": "ok\n"}, "invalid model name"),
        ({"register_model": "m", "register_aliases": ("prod\n",)}, "invalid alias"),
        ({"recipe": "x" * 10_000}, "unknown recipe"),
        ({"recipe_params": {"hidden_units": [2**31]}}, "MAX_LAYER_UNITS"),
        ({"recipe_params": {"hidden_units": [-4]}}, "hidden_units must be a list"),
        ({"recipe_params": {"hidden_units": [True]}}, "hidden_units must be a list"),
        ({"recipe_params": {"hidden_units": [8] * 65}}, "at most 64"),
        ({"recipe_params": {"dropout": 1.0}}, "dropout must be a number from 0"),
        ({"recipe_params": {"activation": "__import__"}}, "activation must be one of"),
        ({"recipe_params": {"units": 3}}, "takes no parameter 'units'"),
        ({"recipe_params": {"hidden_units": [math.nan]}}, "finite numbers only"),
        ({"recipe_params": {"blob": "x" * 100_000}}, "MAX_RECIPE_PARAMS_BYTES"),
        ({"recipe": "cnn", "recipe_params": {"kernel_size": 99}}, "kernel_size must be a whole number from 1 to 15"),
    ],
)
def test_out_of_bounds_fields_are_refused_with_the_limit_named(fields, fragment):
    with pytest.raises(InvalidArgument, match="invalid job spec|invalid model name|invalid alias") as caught:
        check_shape(spec(**fields), SETTINGS)
    assert fragment in str(caught.value)
    assert len(str(caught.value)) < 400, "the error echoes too much of the input"


def test_file_recipe_parameters_are_those_its_build_model_takes():
    fixed = "def build_model(input_shape, num_classes, hidden=8, *, depth=2):\n    pass\n"
    check_recipe_params("file:r.py", {"hidden": 4, "depth": 3}, fixed, 1024, 4096)
    with pytest.raises(InvalidArgument, match=r"takes no parameter\(s\) \['width'\]"):
        check_recipe_params("file:r.py", {"width": 4}, fixed, 1024, 4096)
    open_ended = "import os\ndef build_model(input_shape, num_classes, **params):\n    pass\n"
    check_recipe_params("file:r.py", {"anything": [1, 2]}, open_ended, 1024, 4096)
    with pytest.raises(InvalidArgument, match="defines no top-level build_model"):
        check_recipe_params("file:r.py", {}, "def build(x):\n    pass\n", 1024, 4096)
    with pytest.raises(InvalidArgument, match="not valid Python"):
        check_recipe_params("file:r.py", {}, "def build_model(:\n", 1024, 4096)


def test_the_declared_parameters_are_the_builtin_recipes_keyword_parameters():
    from services.trainer.worker import recipes  # TensorFlow (tf-keras): only this test needs it

    for name, declared in BUILTIN_RECIPE_PARAMS.items():
        parameters = list(inspect.signature(recipes.BUILTIN_RECIPES[name]).parameters)
        assert parameters[:2] == ["input_shape", "num_classes"]
        assert set(parameters[2:]) == set(declared), name
    assert set(BUILTIN_RECIPE_PARAMS) == set(recipes.BUILTIN_RECIPES)
