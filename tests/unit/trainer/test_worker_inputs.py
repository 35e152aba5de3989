"""Training worker in-process: its spec, recipes (built-in and from files) and datasets (csv, npz, tfrecord)."""

import json
from pathlib import Path

import numpy as np
import pytest

from services.clients.agent.worker_spec import DatasetSpec, WorkerSpec
from services.kit.processes import REPO_ROOT

DIGITS = REPO_ROOT / "data" / "digits"
DIGITS_NPZ = {"path": str(DIGITS / "digits.npz"), "format": "npz", "num_classes": 10}


def test_spec_parses_and_rejects_unknown_fields():
    raw = {"recipe": "mlp", "dataset": DIGITS_NPZ, "checkpoint_dir": "/tmp/x", "epochs": 2}
    spec = WorkerSpec.from_json(json.dumps(raw))
    assert spec.dataset.paths == (DIGITS_NPZ["path"],) and spec.epochs == 2 and spec.report_every_steps == 10
    assert WorkerSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown field"):
        WorkerSpec.from_json(json.dumps({**raw, "epoch": 3}))
    with pytest.raises(ValueError, match="format"):
        WorkerSpec.from_json(json.dumps({**raw, "dataset": {**DIGITS_NPZ, "format": "parquet"}}))
    with pytest.raises(ValueError, match="batch_size"):
        WorkerSpec.from_json(json.dumps({**raw, "batch_size": 0}))


@pytest.fixture
def recipes_dir(tmp_path: Path) -> Path:
    root = tmp_path / "recipes"
    (root / "nested").mkdir(parents=True)
    body = (
        "import tf_keras as keras\n\n"
        "def build_model(input_shape, num_classes, units=8):\n"
        "    x = keras.Input(shape=input_shape, name='x')\n"
        "    h = keras.layers.Dense(units, activation='relu')(x)\n"
        "    return keras.Model(x, keras.layers.Dense(num_classes, activation='softmax')(h))\n"
    )
    (root / "nested" / "tiny.py").write_text(body)
    (tmp_path / "outside.py").write_text(body)
    (root / "escape.py").symlink_to(tmp_path / "outside.py")
    (root / "noentry.py").write_text("x = 1\n")
    (root / "broken.py").write_text("import no_such_module_here\n")
    return root


def test_file_recipe_inside_the_directory_builds(recipes_dir: Path):
    from services.trainer.worker.recipes import build_model

    model = build_model("file:nested/tiny.py", (64,), 10, {"units": 4}, str(recipes_dir))
    assert model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="bad recipe_params"):
        build_model("file:nested/tiny.py", (64,), 10, {"layers": 3}, str(recipes_dir))
    with pytest.raises(ValueError, match="no build_model"):
        build_model("file:noentry.py", (64,), 10, {}, str(recipes_dir))
    with pytest.raises(ValueError, match="importing file:broken.py failed"):
        build_model("file:broken.py", (64,), 10, {}, str(recipes_dir))
    with pytest.raises(ValueError, match="build_model failed"):
        build_model("file:nested/tiny.py", (64,), 10, {"units": -1}, str(recipes_dir))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("file:../outside.py", "outside the recipes directory"),
        ("file:nested/../../outside.py", "outside the recipes directory"),
        ("file:/etc/passwd", "relative"),
        ("file:escape.py", "outside the recipes directory"),
        ("file:missing.py", "not a .py file"),
        ("file:nested", "not a .py file"),
        ("resnet9000", "unknown built-in"),
    ],
)
def test_recipe_loading_refuses(recipes_dir: Path, name: str, message: str):
    from services.trainer.worker.recipes import load_recipe

    with pytest.raises(ValueError, match=message):
        load_recipe(name, str(recipes_dir))


def test_file_recipe_needs_a_recipes_dir():
    from services.trainer.worker.recipes import load_recipe

    with pytest.raises(ValueError, match="recipes_dir"):
        load_recipe("file:tiny.py", None)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_builtin_recipes_build(name: str):
    from services.trainer.worker import BUILTIN_RECIPE_NAMES
    from services.trainer.worker.recipes import BUILTIN_RECIPES, build_model

    assert tuple(BUILTIN_RECIPES) == BUILTIN_RECIPE_NAMES  # the names the trainer checks specs against

    model = build_model(name, (64,), 10, {})
    assert model.output_shape == (None, 10)
    probabilities = model(np.zeros((2, 64), np.float32)).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _read_all(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from services.trainer.worker.data import load_examples

    dataset, _ = load_examples(spec)
    x, y, ids = (np.stack(column) for column in zip(*dataset.as_numpy_iterator(), strict=True))
    return x, y, ids


def test_csv_npz_and_tfrecord_give_the_same_examples(tmp_path: Path):
    from services.trainer.worker.data import write_tfrecord

    with np.load(DIGITS / "digits.npz") as arrays:
        x, y = arrays["x"], arrays["y"]
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    write_tfrecord(tmp_path / "digits.tfrecord", x, y, features_key="pixels", label_key="digit")
    specs = [
        DatasetSpec.from_dict(DIGITS_NPZ),
        DatasetSpec.from_dict({"path": str(DIGITS / "digits.csv"), "format": "csv", "label_column": "label"}),
        DatasetSpec.from_dict(
            {
                "path": str(tmp_path / "digits.tfrecord"),
                "format": "tfrecord",
                "features_key": "pixels",
                "label_key": "digit",
            }
        ),
    ]
    for spec in specs:
        got_x, got_y, got_ids = _read_all(spec)
        np.testing.assert_array_equal(got_x, x, err_msg=spec.format)
        np.testing.assert_array_equal(got_y, y, err_msg=spec.format)
        np.testing.assert_array_equal(got_ids, np.arange(len(y)), err_msg=spec.format)


def test_several_files_shard_by_file_and_keep_file_ids(tmp_path: Path):
    from services.trainer.worker.data import AutoShardPolicy, make_training_data, shard_policy

    lines = (DIGITS / "digits.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    paths = []
    for i, part in enumerate((rows[:100], rows[100:250])):
        paths.append(str(tmp_path / f"part-{i}.csv"))
        Path(paths[-1]).write_text("\n".join([header, *part]) + "\n")
    spec = DatasetSpec.from_dict({"paths": paths, "format": "csv", "feature_columns": ["p10", "p20", "p30"]})
    assert shard_policy(spec, num_workers=2) == AutoShardPolicy.FILE
    assert shard_policy(spec, num_workers=3) == AutoShardPolicy.DATA  # fewer files than workers
    x, _, ids = _read_all(spec)
    assert x.shape == (250, 3)
    np.testing.assert_array_equal(ids, np.concatenate([np.arange(100), 2**32 + np.arange(150)]))
    data = make_training_data(
        spec, per_replica_batch=8, num_replicas=2, num_workers=2, validation_split=0.2, seed=1, repeat=False
    )
    assert data.train_examples + data.validation_examples == 250 and data.num_classes == 10
    assert data.global_batch_size == 16 and data.steps_per_epoch == -(-data.train_examples // 16)


def test_validation_split_is_a_stable_function_of_the_example_id():
    from services.trainer.worker.data import split_ids

    ids = np.arange(1797)
    train, validation = split_ids(ids, 0.2, seed=0)
    assert not set(train) & set(validation) and len(train) + len(validation) == 1797
    assert 0.15 < len(validation) / 1797 < 0.25
    np.testing.assert_array_equal(split_ids(ids[::-1], 0.2, seed=0)[1], validation[::-1])
    assert not np.array_equal(split_ids(ids, 0.2, seed=1)[1], validation)
