"""Job specs: the checks a spec must pass before anything is queued, and the worker spec each replica gets."""

import asyncio
import csv
import zipfile
from pathlib import Path

from services.clients.agent.worker_spec import DATASET_FORMATS, OPTIMIZERS, DatasetSpec, WorkerSpec
from services.clients.registry import AsyncRegistryClient
from services.kit.artifacts import file_digest
from services.kit.errors import InvalidArgument, NotFound
from services.kit.modelref import check_alias, check_model_name
from services.trainer.domain import Job
from services.trainer.jobspec import Dataset, JobSpec
from services.trainer.settings import TrainerSettings
from services.trainer.worker import BUILTIN_RECIPE_NAMES, FILE_PREFIX, resolve_recipe_file


def _fail(message: str) -> None:
    raise InvalidArgument(f"invalid job spec: {message}")


def check_shape(spec: JobSpec, settings: TrainerSettings) -> None:
    """Checks everything that needs no I/O beyond the recipes directory."""
    if spec.recipe.startswith(FILE_PREFIX):
        try:
            resolve_recipe_file(spec.recipe[len(FILE_PREFIX) :], settings.recipes_dir)
        except ValueError as exc:
            _fail(str(exc))
    elif spec.recipe not in BUILTIN_RECIPE_NAMES:
        _fail(f"unknown recipe {spec.recipe!r}; built-in recipes are {sorted(BUILTIN_RECIPE_NAMES)}, or file:<path>")
    if not 1 <= spec.workers <= settings.max_workers:
        _fail(f"workers must be between 1 and {settings.max_workers}, got {spec.workers}")
    hp = spec.hyper_parameters.or_defaults()
    if hp.epochs < 1 or hp.batch_size < 1:
        _fail("epochs and batch_size must be at least 1")
    if hp.learning_rate <= 0:
        _fail("learning_rate must be positive")
    if hp.optimizer not in OPTIMIZERS:
        _fail(f"optimizer must be one of {list(OPTIMIZERS)}")
    if not 0 <= hp.validation_split < 1:
        _fail("validation_split must be in [0, 1)")
    if spec.max_restarts is not None and spec.max_restarts < 0:
        _fail("max_restarts must not be negative")
    for name in ("checkpoint_every_steps", "report_every_steps", "step_delay_ms", "hang_timeout_seconds"):
        if getattr(spec, name) < 0:
            _fail(f"{name} must not be negative")
    if spec.register_model:
        check_model_name(spec.register_model)
    for alias in spec.register_aliases:
        check_alias(alias)
    if spec.register_aliases and not spec.register_model:
        _fail("register_aliases needs register_model")
    if spec.dataset.format not in DATASET_FORMATS:
        _fail(f"dataset format must be one of {list(DATASET_FORMATS)}")
    if not spec.dataset.blob_digest and not spec.dataset.local_path:
        _fail("dataset needs blob_digest or local_path")


async def locate_dataset(spec: JobSpec, settings: TrainerSettings, registry: AsyncRegistryClient) -> tuple[Path, str]:
    """The data set as a local file the agents can read, and its sha256. A registry blob is downloaded into the
    shared directory once."""
    dataset = spec.dataset
    if digest := dataset.blob_digest:
        path = settings.shared_dir.resolve() / "datasets" / f"{digest}.{dataset.format}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            try:
                await registry.download_blob(digest, partial)
            except NotFound:
                _fail(f"dataset blob {digest} is not in the registry (upload it with UploadBlob)")
            except InvalidArgument as exc:
                _fail(f"dataset blob digest: {exc}")
            partial.rename(path)
    else:
        path = Path(dataset.local_path).resolve()
        if not path.is_file():
            _fail(f"dataset file {dataset.local_path!r} does not exist (or is not a file)")
        digest = await asyncio.to_thread(file_digest, path)
    await asyncio.to_thread(_check_columns, path, dataset)
    return path, digest


def _check_columns(path: Path, dataset: Dataset) -> None:
    """The label and feature columns (CSV) or arrays (NPZ) named in the spec exist."""
    if dataset.format == "csv":
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        label = dataset.label_column or "label"
        missing = [c for c in [label, *dataset.feature_columns] if c not in header]
        if missing:
            _fail(f"dataset {path.name} has no column(s) {missing}; its columns are {header[:10]}...")
    elif dataset.format == "npz":
        try:
            with zipfile.ZipFile(path) as archive:
                arrays = {name.removesuffix(".npy") for name in archive.namelist()}
        except zipfile.BadZipFile:
            _fail(f"dataset {path.name} is not an NPZ file")
        for key in (dataset.features_key or "x", dataset.label_key or "y"):
            if key not in arrays:
                _fail(f"dataset {path.name} has no array {key!r}; it has {sorted(arrays)}")


def job_dir(settings: TrainerSettings, job: Job) -> Path:
    return settings.shared_dir.resolve() / "jobs" / job.id


def worker_spec(job: Job, settings: TrainerSettings) -> WorkerSpec:
    """The spec every replica of `job` runs: the job's spec with the defaults filled in and its paths."""
    spec, hp, dataset = job.spec, job.spec.hyper_parameters.or_defaults(), job.spec.dataset
    base = job_dir(settings, job)
    optional = {
        "label_column": dataset.label_column,
        "features_key": dataset.features_key,
        "label_key": dataset.label_key,
    }
    return WorkerSpec(
        recipe=spec.recipe,
        recipe_params=spec.recipe_params,
        recipes_dir=str(settings.recipes_dir.resolve()),
        dataset=DatasetSpec(
            format=dataset.format,
            paths=(job.dataset_path,),
            feature_columns=dataset.feature_columns or None,
            num_classes=dataset.num_classes or None,
            **{name: value for name, value in optional.items() if value},
        ),
        checkpoint_dir=str(base / "checkpoints"),
        export_dir=str(base / "export"),
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
    )
