"""The recipe contract in a worker, in process: TASK and hooks read from a module, regression labels (scalars and
vectors) from NPZ, CSV and TFRecord, preprocess hooks in the pipeline, the loss and metrics a task defaults to, the
export's serving outputs; and the checks a spec's recipe source gets at submit (TASK, registry references)."""

import types

import numpy as np
import pytest

from modelgrid.client.errors import InvalidArgument
from services.clients.agent.worker_spec import DatasetSpec
from services.kit.processes import REPO_ROOT
from services.trainer.limits import check_recipe_params
from services.trainer.registry_recipes import parse_recipe_ref, worker_recipe_name
from services.trainer.worker.contract import CLASSIFICATION, REGRESSION, recipe_from_module

REGRESSION_NPZ = REPO_ROOT / "data" / "regression" / "regression.npz"
EXAMPLES = REPO_ROOT / "examples" / "recipes"


def module(**names) -> types.ModuleType:
    m = types.ModuleType("recipe_under_test")
    m.__dict__.update(names)
    return m


def build(input_shape, num_outputs, **params):
    return None


def test_a_module_is_a_classifier_without_hooks_unless_it_says_otherwise():
    plain = recipe_from_module("file:a.py", module(build_model=build))
    assert plain.task == CLASSIFICATION and plain.loss is plain.metrics is plain.preprocess is None
    assert not plain.reshapes_labels
    hooked = recipe_from_module("file:b.py", module(build_model=build, TASK=REGRESSION, preprocess=lambda x, y: (x, y)))
    assert hooked.task == REGRESSION and hooked.reshapes_labels
    with pytest.raises(ValueError, match="defines no build_model"):
        recipe_from_module("file:c.py", module(build_model=3))
    with pytest.raises(ValueError, match="TASK .*'ranking'.* must be one of"):
        recipe_from_module("file:d.py", module(build_model=build, TASK="ranking"))
    with pytest.raises(ValueError, match="loss must be a function"):
        recipe_from_module("file:e.py", module(build_model=build, loss="mse"))


def test_submit_checks_the_task_and_the_parameters_of_a_recipe_source():
    source = "TASK = 'regression'\ndef build_model(input_shape, num_outputs, hidden_units=(8,)):\n    pass\n"
    check_recipe_params("registry:r/1", {"hidden_units": [4]}, source, 1024, 4096)
    with pytest.raises(InvalidArgument, match=r"takes no parameter\(s\) \['depth'\]"):
        check_recipe_params("registry:r/1", {"depth": 2}, source, 1024, 4096)
    with pytest.raises(InvalidArgument, match="TASK to 'clustering'; it must be one of"):
        check_recipe_params("registry:r/1", {}, source.replace("regression", "clustering"), 1024, 4096)
    with pytest.raises(InvalidArgument, match="not valid Python"):
        check_recipe_params("registry:r/1", {}, "def build_model(:\n", 1024, 4096)
    with pytest.raises(InvalidArgument, match="not valid Python"):
        check_recipe_params("registry:r/1", {}, "x = 1\x00\n", 1024, 4096)
    for shipped in ("regression_mlp.py", "two_targets.py"):
        check_recipe_params("registry:r/1", {}, (EXAMPLES / shipped).read_text(), 1024, 4096)


@pytest.mark.parametrize(
    "ref", ["registry:", "registry:name", "registry:name/", "registry:name/0", "registry:name/x", "registry:/1",
            "registry:a/b/1", "registry:../1", "registry:name/1 ", "registry:name/-1"]
)  # fmt: skip
def test_a_malformed_registry_reference_is_an_invalid_argument(ref: str):
    with pytest.raises(InvalidArgument, match="invalid job spec: recipe"):
        parse_recipe_ref(ref)


def test_a_registry_reference_names_a_model_version_and_a_worker_file():
    assert parse_recipe_ref("registry:regression-mlp/12") == ("regression-mlp", 12)
    assert worker_recipe_name("registry:my.recipe_2/3") == "file:registry/my.recipe_2/3.py"


# -- in the worker (TensorFlow) ---------------------------------------------------------------------------------


def regression_spec(label_key: str = "y", path=REGRESSION_NPZ, fmt: str = "npz") -> DatasetSpec:
    return DatasetSpec.from_dict({"path": str(path), "format": fmt, "label_key": label_key})


def test_regression_labels_are_floats_and_their_width_is_the_number_of_outputs(tmp_path):
    from services.trainer.worker.data import make_training_data, write_tfrecord

    def data(spec, recipe=None):
        return make_training_data(
            spec, per_replica_batch=16, num_replicas=1, num_workers=1, validation_split=0.2, seed=1, recipe=recipe
        )

    regression = recipe_from_module("r", module(build_model=build, TASK=REGRESSION))
    scalar = data(regression_spec("y"), regression)
    x, y = next(iter(scalar.train))
    assert y.dtype.name == "float32" and y.shape == (16,) and x.shape == (16, 8) and scalar.num_outputs == 1
    assert scalar.train_examples + scalar.validation_examples == 1000
    vector = data(regression_spec("y2"), regression)
    assert vector.num_outputs == 2 and next(iter(vector.train))[1].shape == (16, 2)
    # A classifier refuses the same float vectors (labels are one class per example).
    with pytest.raises(ValueError, match="label array of shape"):
        data(regression_spec("y2"))

    # The hooks run in the pipeline: per example, then per batch.
    hooked = recipe_from_module(
        "h",
        module(
            build_model=build,
            TASK=REGRESSION,
            preprocess=lambda x, y: (x * 0.0, {"first": y[0:1], "second": y[1:2]}),
            preprocess_batch=lambda x, y: (x + 1.0, y),
        ),
    )
    x, y = next(iter(data(regression_spec("y2"), hooked).train))
    assert np.all(x.numpy() == 1.0) and set(y) == {"first", "second"} and y["second"].shape == (16, 1)
    # A hook that raises anything while it is traced is the recipe's fault: ValueError, an invalid job, no restart.
    broken = recipe_from_module("b", module(build_model=build, TASK=REGRESSION, preprocess=lambda x, y: x["nope"]))
    with pytest.raises(ValueError, match="a preprocess hook failed"):
        data(regression_spec("y"), broken)

    # CSV and TFRecord carry float labels too (TFRecord: a vector of targets as well).
    arrays = np.load(REGRESSION_NPZ)
    csv_path = tmp_path / "r.csv"
    rows = ["a,b,label"] + [f"{a},{b},{t}" for (a, b), t in zip(arrays["x"][:50, :2], arrays["y"][:50], strict=True)]
    csv_path.write_text("\n".join(rows) + "\n")
    from_csv = data(DatasetSpec.from_dict({"path": str(csv_path), "format": "csv"}), regression)
    assert next(iter(from_csv.train))[1].dtype.name == "float32"
    record = tmp_path / "r.tfrecord"
    write_tfrecord(record, arrays["x"][:50], arrays["y2"][:50])
    from_records = data(regression_spec(path=record, fmt="tfrecord"), regression)
    assert from_records.num_outputs == 2 and next(iter(from_records.train))[1].shape == (16, 2)


def test_the_task_sets_the_default_loss_and_metrics_and_the_serving_output(tmp_path):
    import tensorflow as tf
    import tf_keras as keras

    from services.trainer.worker.recipes import build_model, load, mlp
    from services.trainer.worker.train import compile_args, export

    classifier = compile_args(recipe_from_module("c", module(build_model=mlp)))
    assert isinstance(classifier["loss"], keras.losses.SparseCategoricalCrossentropy)
    assert classifier["metrics"] == ["accuracy"]
    regression = compile_args(recipe_from_module("r", module(build_model=mlp, TASK=REGRESSION)))
    assert isinstance(regression["loss"], keras.losses.MeanSquaredError)
    assert [m.name for m in regression["metrics"]] == ["mse", "mae"]

    recipe = load("file:regression_mlp.py", EXAMPLES)
    assert recipe.task == REGRESSION and [m.name for m in compile_args(recipe)["metrics"]] == ["mse", "mae", "rmse"]

    def one_wide(input_shape, num_outputs):  # ignores num_outputs: one output for 3 targets would broadcast
        return mlp(input_shape, 1)

    with pytest.raises(ValueError, match=r"is not \[batch, 3\]"):
        build_model(recipe_from_module("narrow", module(build_model=one_wide, TASK=REGRESSION)), (8,), 3, {})
    model = build_model(recipe, (8,), 1, {"hidden_units": [4]})
    export(model, (8,), str(tmp_path / "single"), tmp_path / "scratch", True, recipe.task)
    serving = tf.saved_model.load(str(tmp_path / "single")).signatures["serving_default"]
    assert set(serving.structured_outputs) == {"predictions"}

    two = load("file:two_targets.py", EXAMPLES)
    model = build_model(two, (8,), 2, {"trunk_units": 4})
    export(model, (8,), str(tmp_path / "multi"), tmp_path / "scratch", True, two.task)
    serving = tf.saved_model.load(str(tmp_path / "multi")).signatures["serving_default"]
    assert set(serving.structured_outputs) == {"first", "second"}
    with pytest.raises(ValueError, match="build_model failed"):
        build_model(two, (8,), 3, {})
