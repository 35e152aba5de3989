"""Datasets for training workers: CSV, NPZ and TFRecord sources, the validation split, tf.data auto-sharding.

Every source yields `(features float32, label, example_id int64)` in file order, the label an int64 class for
classification and float32 (a scalar, or a vector of several targets) for regression (the recipe's TASK), where
the example id is `file_index * 2**32 + row` (so for a single file, the row index). The validation split is a
keyed hash of the example id, hence the same on every worker and for every format, with no shuffle state to share.

Sharding follows tf.data auto-sharding with an explicit policy: one file (or NPZ, which has no tf.data file
reader) -> DATA: every worker reads everything in the same seeded order and keeps its own part of each global
batch; several files, at least one per worker -> FILE: every worker reads its own files.
"""

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from services.clients.agent.worker_spec import DatasetSpec
from services.trainer.worker.contract import CLASSIFICATION, REGRESSION, TASKS, Recipe

logger = logging.getLogger(__name__)

AutoShardPolicy = tf.data.experimental.AutoShardPolicy

ROWS_PER_FILE = 2**32
_HASH_BUCKETS = 1_000_000
_HASH_KEY_LOW = 0x6D6F64656C677269  # "modelgri": a fixed second half of the SipHash key


@dataclass(frozen=True)
class TrainingData:
    """The batched datasets fit() consumes and what the training loop needs to know about them."""

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    train_examples: int
    validation_examples: int
    steps_per_epoch: int
    global_batch_size: int
    shard_policy: AutoShardPolicy
    input_shape: tuple[int, ...]
    num_outputs: int
    """Classification: the number of classes; regression: target values per example (1 for a scalar label)."""

    @property
    def num_classes(self) -> int:
        """The number of classes of a classification data set (num_outputs)."""
        return self.num_outputs


def shard_policy(spec: DatasetSpec, num_workers: int) -> AutoShardPolicy:
    """FILE when there are several readable files and at least one per worker, DATA otherwise."""
    if spec.format != "npz" and len(spec.paths) > 1 and len(spec.paths) >= num_workers:
        return AutoShardPolicy.FILE
    return AutoShardPolicy.DATA


def is_validation(example_ids: tf.Tensor, fraction: float, seed: int) -> tf.Tensor:
    """True for the ids that belong to the validation split (a keyed SipHash of the id, about `fraction`)."""
    buckets = tf.strings.to_hash_bucket_strong(
        tf.strings.as_string(example_ids), _HASH_BUCKETS, key=[seed & (2**64 - 1), _HASH_KEY_LOW]
    )
    return buckets < int(round(fraction * _HASH_BUCKETS))


def split_ids(example_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids) of the given example ids, as the workers split them."""
    ids = np.asarray(example_ids, dtype=np.int64)
    mask = is_validation(tf.constant(ids), fraction, seed).numpy() if len(ids) else np.zeros(0, bool)
    return ids[~mask], ids[mask]


def load_examples(spec: DatasetSpec, task: str = CLASSIFICATION) -> tuple[tf.data.Dataset, tuple[int, ...]]:
    """All examples as `(x, y, example_id)` in file order, and the shape of one x. Classification labels are int64
    scalars; regression labels float32, a scalar or (NPZ, TFRecord) a vector of targets."""
    if task not in TASKS:
        raise ValueError(f"dataset: unknown task {task!r}")
    for path in spec.paths:
        if not Path(path).is_file():
            raise ValueError(f"dataset: {path} is not a file")
    readers = {"npz": _npz_examples, "csv": _csv_examples, "tfrecord": _tfrecord_examples}
    return readers[spec.format](spec, task)


def _npz_examples(spec: DatasetSpec, task: str) -> tuple[tf.data.Dataset, tuple[int, ...]]:
    xs, ys, ids = [], [], []
    for index, path in enumerate(spec.paths):
        with np.load(path) as arrays:
            for key in (spec.features_key, spec.label_key):
                if key not in arrays:
                    raise ValueError(f"dataset: {path} has no array {key!r} (has {', '.join(arrays.files)})")
            x, y = arrays[spec.features_key], arrays[spec.label_key]
        label_dims = (1, 2) if task == REGRESSION else (1,)
        if len(x) != len(y) or y.ndim not in label_dims:
            raise ValueError(f"dataset: {path}: {len(x)} feature rows but label array of shape {y.shape}")
        if task == REGRESSION and not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"dataset: {path}: regression labels must be numbers, got {y.dtype}")
        xs.append(x.astype(np.float32))
        ys.append(y.astype(np.float32 if task == REGRESSION else np.int64))
        ids.append(index * ROWS_PER_FILE + np.arange(len(y), dtype=np.int64))
    x = np.concatenate(xs)
    if len({a.shape[1:] for a in xs}) != 1:
        raise ValueError("dataset: NPZ files disagree on the feature shape")
    if len({a.shape[1:] for a in ys}) != 1:
        raise ValueError("dataset: NPZ files disagree on the label shape")
    return tf.data.Dataset.from_tensor_slices((x, np.concatenate(ys), np.concatenate(ids))), tuple(x.shape[1:])


def _files(spec: DatasetSpec) -> tf.data.Dataset:
    indices = tf.constant(range(len(spec.paths)), dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((indices, list(spec.paths)))


def _with_ids(file_index: tf.Tensor, rows: tf.data.Dataset) -> tf.data.Dataset:
    return rows.enumerate().map(lambda row, record: (record, file_index * ROWS_PER_FILE + row))


def _csv_examples(spec: DatasetSpec, task: str) -> tuple[tf.data.Dataset, tuple[int, ...]]:
    headers = []
    for path in spec.paths:
        with open(path, newline="") as f:
            headers.append(next(csv.reader(f), []))
    if any(h != headers[0] for h in headers):
        raise ValueError("dataset: CSV files have different headers")
    header = headers[0]
    if spec.label_column not in header:
        raise ValueError(f"dataset: CSV has no label column {spec.label_column!r}")
    features = list(spec.feature_columns or [c for c in header if c != spec.label_column])
    missing = [c for c in features if c not in header]
    if missing or not features:
        raise ValueError(f"dataset: CSV feature columns missing: {', '.join(missing) or '(none given)'}")
    label_index = header.index(spec.label_column)
    label_default = tf.constant(0.0) if task == REGRESSION else tf.constant(0, tf.int64)
    defaults = [label_default if i == label_index else tf.constant(0.0) for i in range(len(header))]
    feature_indices = [header.index(c) for c in features]

    def parse(line: tf.Tensor, example_id: tf.Tensor):
        columns = tf.io.decode_csv(line, record_defaults=defaults)
        x = tf.stack([columns[i] for i in feature_indices])
        return x, columns[label_index], example_id

    def read(file_index, path):
        return _with_ids(file_index, tf.data.TextLineDataset(path).skip(1))

    rows = _files(spec).interleave(read, cycle_length=1)
    return rows.map(parse), (len(features),)


def _tfrecord_examples(spec: DatasetSpec, task: str) -> tuple[tf.data.Dataset, tuple[int, ...]]:
    first = next(iter(tf.data.TFRecordDataset(spec.paths[0]).take(1)), None)
    if first is None:
        raise ValueError(f"dataset: {spec.paths[0]} holds no records")
    example = tf.train.Example.FromString(first.numpy())
    if spec.features_key not in example.features.feature or spec.label_key not in example.features.feature:
        raise ValueError(f"dataset: records lack feature {spec.features_key!r} or label {spec.label_key!r}")
    width = len(example.features.feature[spec.features_key].float_list.value)
    if task == REGRESSION:  # a float label of one value (a scalar) or of several (a vector of targets)
        targets = len(example.features.feature[spec.label_key].float_list.value)
        label = tf.io.FixedLenFeature([] if targets == 1 else [targets], tf.float32)
    else:
        label = tf.io.FixedLenFeature([], tf.int64)
    schema = {spec.features_key: tf.io.FixedLenFeature([width], tf.float32), spec.label_key: label}

    def parse(record: tf.Tensor, example_id: tf.Tensor):
        parsed = tf.io.parse_single_example(record, schema)
        return parsed[spec.features_key], parsed[spec.label_key], example_id

    def read(file_index, path):
        return _with_ids(file_index, tf.data.TFRecordDataset(path))

    rows = _files(spec).interleave(read, cycle_length=1)
    return rows.map(parse), (width,)


def write_tfrecord(path: str | Path, x: np.ndarray, y: np.ndarray, features_key: str = "x", label_key: str = "y"):
    """Writes one tf.train.Example per row: float feature `features_key` (flattened), and `label_key`: int64 for
    integer labels, float (flattened: a scalar or a vector of targets) for floating-point ones."""
    y = np.asarray(y)
    floats = np.issubdtype(y.dtype, np.floating)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for features, label in zip(np.asarray(x, np.float32), y, strict=True):
            if floats:
                label_feature = tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(label)))
            else:
                label_feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        features_key: tf.train.Feature(float_list=tf.train.FloatList(value=features.ravel())),
                        label_key: label_feature,
                    }
                )
            )
            writer.write(example.SerializeToString())


def make_training_data(
    spec: DatasetSpec,
    *,
    per_replica_batch: int,
    num_replicas: int,
    num_workers: int,
    validation_split: float,
    seed: int,
    with_ids: bool = False,
    repeat: bool = True,
    recipe: Recipe | None = None,
) -> TrainingData:
    """Shuffled, batched (global batch = per-replica batch x replicas), shard-policy-tagged datasets.

    with_ids keeps the example id as a third component (for checking shards, not for fit); repeat makes the
    training set endless so that fit's explicit steps_per_epoch decides where epochs end. The recipe (default: a
    classifier with no hooks) says how to read the labels, and its preprocess hooks are applied to both splits
    (not with with_ids, which only reads which examples each worker gets).
    """
    task = recipe.task if recipe else CLASSIFICATION
    examples, input_shape = load_examples(spec, task)
    policy = shard_policy(spec, num_workers)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = policy

    def in_validation(x, y, example_id):
        return is_validation(example_id, validation_split, seed)

    train = examples.filter(lambda *e: tf.logical_not(in_validation(*e)))
    validation = examples.filter(in_validation)
    train_examples = _count(train)
    validation_examples = _count(validation) if validation_split > 0 else 0
    if train_examples == 0:
        raise ValueError("dataset: no training examples")
    if task == REGRESSION:
        label_shape = examples.element_spec[1].shape
        num_outputs = int(label_shape[0]) if label_shape.rank == 1 else 1
    else:
        num_outputs = spec.num_classes or max(2, 1 + int(examples.reduce(tf.constant(-1, tf.int64), _max_label)))
    hooks = recipe if recipe is not None and not with_ids else None
    try:  # the recipe's preprocess hooks are traced here: an exception of theirs is a property of the recipe
        if hooks is not None and hooks.preprocess is not None:
            per_example = hooks.preprocess
            train = train.map(lambda x, y, example_id: (*per_example(x, y), example_id))
            validation = validation.map(lambda x, y, example_id: (*per_example(x, y), example_id))

        global_batch = per_replica_batch * num_replicas
        drop_id = (lambda x, y, example_id: (x, y)) if not with_ids else None
        if hooks is not None and hooks.preprocess_batch is not None:
            per_batch = hooks.preprocess_batch
            drop_id = lambda x, y, example_id: per_batch(x, y)  # noqa: E731
        train = train.shuffle(min(train_examples, 100_000), seed=seed, reshuffle_each_iteration=True)
        train = train.batch(global_batch)
        if drop_id:
            train = train.map(drop_id)
        if repeat:
            train = train.repeat()
        train = train.with_options(options).prefetch(tf.data.AUTOTUNE)
        if validation_examples:
            validation = validation.batch(global_batch)
            validation = (validation.map(drop_id) if drop_id else validation).with_options(options)
        else:
            validation = None
    except Exception as exc:
        if hooks is None:
            raise
        raise ValueError(f"recipe {getattr(hooks, 'name', '')}: a preprocess hook failed: {exc!r}"[:500]) from exc
    steps = -(-train_examples // global_batch)
    logger.info(
        "dataset %s: %d train / %d validation examples, global batch %d, %d steps per epoch, shard policy %s",
        ",".join(spec.paths),
        train_examples,
        validation_examples,
        global_batch,
        steps,
        policy.name,
    )
    return TrainingData(
        train, validation, train_examples, validation_examples, steps, global_batch, policy, input_shape, num_outputs
    )


def _max_label(largest: tf.Tensor, example: tuple) -> tf.Tensor:
    return tf.maximum(largest, example[1])


def _count(dataset: tf.data.Dataset) -> int:
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
