"""Job specs: the checks a spec must pass before anything is queued, and what each replica gets: a worker spec that
names no path of the trainer's host, and its data as registry blobs.

Nothing here reads or writes a path another host produced. A job's data set reaches the agents as a registry blob
only: a `local_path` (a file on the trainer's own host, inside a directory the operator lists in `dataset_roots`)
is uploaded to the registry once, at submit, and the job keeps its digest; a `blob_digest` is downloaded into the
trainer's own scratch (to check its columns). Checkpoints and the SavedModel come back from the chief's agent as
blobs too (see runner.py).
"""

import asyncio
import csv
import uuid
import zipfile
from pathlib import Path
from typing import NoReturn

from modelgrid.client.artifacts import check_digest, file_digest
from modelgrid.client.errors import InvalidArgument, NotFound
from modelgrid.client.modelref import check_alias, check_model_name, shown
from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent.types import Checkpoint, ReplicaData
from services.clients.agent.worker_spec import (
    DATASET_FORMATS,
    MAX_RECIPE_SOURCE_BYTES,
    OPTIMIZERS,
    DatasetSpec,
    WorkerSpec,
)
from services.trainer.domain import Job
from services.trainer.jobspec import Dataset, JobSpec
from services.trainer.limits import check_number, check_recipe_params
from services.trainer.registry_recipes import cached_recipe, is_registry_recipe, parse_recipe_ref, worker_recipe_name
from services.trainer.settings import TrainerSettings
from services.trainer.worker import BUILTIN_RECIPE_NAMES, FILE_PREFIX, resolve_recipe_file

SETTING = "MODELGRID_TRAINER_"
MAX_NAME_CHARS = 256
"""Longest job name, column name or array key."""
MAX_PATH_CHARS = 4096
MAX_COLUMNS = 100_000
MAX_ALIASES = 16


def _fail(message: str) -> NoReturn:
    raise InvalidArgument(f"invalid job spec: {message}")


def check_shape(spec: JobSpec, settings: TrainerSettings, registry_source: str | None = None) -> None:
    """Checks everything that needs no I/O beyond the recipes directory: every number within the trainer's limits,
    names and sizes bounded, recipe parameters as the recipe declares them. A registry recipe's source is fetched
    by the caller and given as `registry_source` (None: only its reference is checked)."""
    source = ""
    if spec.recipe.startswith(FILE_PREFIX):
        source = recipe_source(spec, settings)
    elif is_registry_recipe(spec.recipe):
        parse_recipe_ref(spec.recipe)
        source = registry_source or ""
    elif spec.recipe not in BUILTIN_RECIPE_NAMES:
        _fail(
            f"unknown recipe {shown(spec.recipe)}; built-in recipes are {sorted(BUILTIN_RECIPE_NAMES)}, "
            "file:<path> or registry:<name>/<version>"
        )
    if len(spec.name) > MAX_NAME_CHARS:
        _fail(f"name is longer than {MAX_NAME_CHARS} characters")
    if not 1 <= spec.workers <= settings.max_workers:
        _fail(f"workers must be between 1 and {settings.max_workers}, got {spec.workers}")
    hp = spec.hyper_parameters.or_defaults()
    check_number("epochs", hp.epochs, 1, settings.max_epochs, f"{SETTING}MAX_EPOCHS")
    check_number("batch_size", hp.batch_size, 1, settings.max_batch_size, f"{SETTING}MAX_BATCH_SIZE")
    check_number("learning_rate", hp.learning_rate, 1e-12, 10.0)
    if hp.optimizer not in OPTIMIZERS:
        _fail(f"optimizer must be one of {list(OPTIMIZERS)}")
    check_number("validation_split", hp.validation_split, 0, 0.99)
    check_number("seed", hp.seed, 0, 2**31 - 1)
    if spec.max_restarts is not None:
        check_number("max_restarts", spec.max_restarts, 0, settings.max_restarts_limit, f"{SETTING}MAX_RESTARTS_LIMIT")
    for name in ("checkpoint_every_steps", "report_every_steps"):
        check_number(name, getattr(spec, name), 0, settings.max_steps_interval, f"{SETTING}MAX_STEPS_INTERVAL")
    check_number("step_delay_ms", spec.step_delay_ms, 0, 60_000)
    check_number("hang_timeout_seconds", spec.hang_timeout_seconds, 0, 7 * 24 * 3600)
    if spec.register_model:
        check_model_name(spec.register_model)
    if len(spec.register_aliases) > MAX_ALIASES:
        _fail(f"at most {MAX_ALIASES} register_aliases")
    for alias in spec.register_aliases:
        check_alias(alias)
    if spec.register_aliases and not spec.register_model:
        _fail("register_aliases needs register_model")
    _check_dataset_fields(spec.dataset, settings)
    if is_registry_recipe(spec.recipe) and registry_source is None:
        return  # its parameters are checked once its source is fetched
    check_recipe_params(
        spec.recipe, spec.recipe_params, source, settings.max_layer_units, settings.max_recipe_params_bytes
    )


def _check_dataset_fields(dataset: Dataset, settings: TrainerSettings) -> None:
    if dataset.format not in DATASET_FORMATS:
        _fail(f"dataset format must be one of {list(DATASET_FORMATS)}")
    if not dataset.blob_digest and not dataset.local_path:
        _fail("dataset needs blob_digest or local_path")
    if len(dataset.local_path) > MAX_PATH_CHARS:
        _fail(f"dataset.local_path is longer than {MAX_PATH_CHARS} characters")
    check_number("dataset.num_classes", dataset.num_classes, 0, settings.max_num_classes, f"{SETTING}MAX_NUM_CLASSES")
    if dataset.num_classes == 1:
        _fail("dataset.num_classes must be at least 2 (or 0: derived from the labels)")
    if len(dataset.feature_columns) > MAX_COLUMNS:
        _fail(f"at most {MAX_COLUMNS} feature_columns")
    names = [*dataset.feature_columns, dataset.label_column, dataset.features_key, dataset.label_key]
    if any(len(name) > MAX_NAME_CHARS for name in names):
        _fail(f"column and key names are at most {MAX_NAME_CHARS} characters")


def recipe_source(spec: JobSpec, settings: TrainerSettings) -> str:
    """The source of a file recipe, read from the trainer's own recipes directory (it travels in the worker spec);
    "" for a built-in recipe. InvalidArgument when it is not a .py file inside the directory or is too large."""
    if not spec.recipe.startswith(FILE_PREFIX):
        return ""
    try:
        path = resolve_recipe_file(spec.recipe[len(FILE_PREFIX) :], settings.recipes_dir)
        data = path.read_bytes()
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if len(data) > MAX_RECIPE_SOURCE_BYTES:
        _fail(f"recipe {spec.recipe} is larger than {MAX_RECIPE_SOURCE_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        _fail(f"recipe {spec.recipe} is not UTF-8 text")


async def locate_dataset(spec: JobSpec, settings: TrainerSettings, registry: AsyncRegistryClient) -> str:
    """The sha256 of the job's data set as a registry blob, its columns checked. A local file (inside one of the
    operator's `dataset_roots`) is uploaded unless the registry holds those bytes already; a blob is downloaded into
    the trainer's scratch once (to read its columns). No error tells anything of a file the caller could not
    read already: not whether a path outside the roots exists, nor any of a file's content."""
    dataset = spec.dataset
    if digest := dataset.blob_digest:
        check_digest(digest)  # before the digest names anything on disk
        path = settings.scratch_dir.resolve() / "datasets" / digest
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{digest}.{uuid.uuid4().hex[:8]}.partial")
            try:
                await registry.download_blob(digest, partial)
                partial.rename(path)
            except NotFound:
                _fail(f"dataset blob {digest} is not in the registry (upload it with UploadBlob)")
            finally:
                partial.unlink(missing_ok=True)
        await asyncio.to_thread(_check_columns, path, dataset)
        return digest
    path = confined_path(dataset.local_path, settings.dataset_roots)
    if not path.is_file():
        _fail("dataset.local_path is not a file inside the trainer's data set roots")
    await asyncio.to_thread(_check_columns, path, dataset)
    digest = await asyncio.to_thread(file_digest, path)
    try:
        await registry.stat_blob(digest)
    except NotFound:
        blob = await registry.upload_blob(path)
        if blob.digest != digest:
            raise InvalidArgument("dataset.local_path changed while it was uploaded") from None
    return digest


def confined_path(local_path: str, roots: list[Path]) -> Path:
    """`local_path` resolved (symlinks, `..`), when it lies inside one of `roots`; else InvalidArgument, the same
    whether or not the path exists."""
    if not roots:
        _fail(
            "this trainer takes no local data set paths: upload the file to the registry and give its blob_digest "
            "(`modelgrid jobs submit` does this for dataset.local_path), or have the operator list its directory "
            "in MODELGRID_TRAINER_DATASET_ROOTS"
        )
    path = Path(local_path)
    if not path.is_absolute() or "\x00" in local_path:
        _fail("dataset.local_path must be an absolute path")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        _fail("dataset.local_path is not a file inside the trainer's data set roots")
    return resolved


def _check_columns(path: Path, dataset: Dataset) -> None:
    """The label and feature columns (CSV) or arrays (NPZ) named in the spec exist. The errors name only what the
    spec asked for, never what the file holds."""
    if dataset.format == "csv":
        try:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
        except (UnicodeDecodeError, csv.Error):
            _fail("the data set is not a UTF-8 CSV file with a header line")
        label = dataset.label_column or "label"
        missing = [c for c in [label, *dataset.feature_columns] if c not in header]
        if missing:
            _fail(f"the data set's header has no column(s) {missing}")
    elif dataset.format == "npz":
        try:
            with zipfile.ZipFile(path) as archive:
                arrays = {name.removesuffix(".npy") for name in archive.namelist()}
        except zipfile.BadZipFile:
            _fail("the data set is not an NPZ file")
        for key in (dataset.features_key or "x", dataset.label_key or "y"):
            if key not in arrays:
                _fail(f"the data set has no array {key!r}")


def worker_spec(job: Job, settings: TrainerSettings) -> WorkerSpec:
    """The spec every replica of `job`'s current attempt runs, with the defaults filled in and no path: each
    replica's agent sets the paths to its own directories (WorkerSpec.with_paths)."""
    spec, hp, dataset = job.spec, job.spec.hyper_parameters.or_defaults(), job.spec.dataset
    optional = {
        "label_column": dataset.label_column,
        "features_key": dataset.features_key,
        "label_key": dataset.label_key,
    }
    if is_registry_recipe(spec.recipe):  # it travels like a file recipe: the agent writes it where the worker reads
        recipe, source = worker_recipe_name(spec.recipe), cached_recipe(spec.recipe, job.recipe_digest, settings).source
    else:
        recipe, source = spec.recipe, recipe_source(spec, settings)
    return WorkerSpec(
        recipe=recipe,
        recipe_params=spec.recipe_params,
        recipe_source=source,
        dataset=DatasetSpec(
            format=dataset.format,
            feature_columns=dataset.feature_columns or None,
            num_classes=dataset.num_classes or None,
            **{name: value for name, value in optional.items() if value},
        ),
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        optimizer=hp.optimizer,
        validation_split=hp.validation_split,
        seed=hp.seed,
        checkpoint_every_steps=spec.checkpoint_every_steps or settings.default_checkpoint_every_steps,
        report_every_steps=spec.report_every_steps or settings.default_report_every_steps,
        step_delay_ms=spec.step_delay_ms,
        record_shard_ids=settings.record_shard_ids,
        attempt=job.attempt,
        snapshot_checkpoint_every=settings.upload_checkpoint_every,
    )


def replica_data(job: Job) -> ReplicaData:
    """The registry blobs every replica of `job`'s current attempt works on: its data set, and the newest uploaded
    checkpoint to resume from."""
    checkpoint = job.checkpoint
    restore = Checkpoint(checkpoint.digest, checkpoint.step) if checkpoint is not None else None
    return ReplicaData(dataset_digest=job.dataset_digest, restore=restore)
