"""Job specs: the checks a spec must pass before anything is queued, and the worker spec each replica gets."""

import asyncio
import csv
import zipfile
from pathlib import Path
from typing import Any

import grpc

from services.kit.artifacts import file_digest
from services.kit.errors import InvalidArgument
from services.kit.modelref import check_alias, check_model_name
from services.registry.async_client import AsyncRegistryClient
from services.trainer.domain import Job
from services.trainer.settings import TrainerSettings
from services.trainer.worker import BUILTIN_RECIPE_NAMES, DATASET_FORMATS, OPTIMIZERS, resolve_recipe_file

FILE_PREFIX = "file:"


def _fail(message: str) -> None:
    raise InvalidArgument(f"invalid job spec: {message}")


def check_shape(spec: dict[str, Any], settings: TrainerSettings) -> None:
    """Checks everything that needs no I/O beyond the recipes directory."""
    recipe = spec.get("recipe", "")
    if recipe.startswith(FILE_PREFIX):
        try:
            resolve_recipe_file(recipe[len(FILE_PREFIX) :], settings.recipes_dir)
        except ValueError as exc:
            _fail(str(exc))
    elif recipe not in BUILTIN_RECIPE_NAMES:
        _fail(f"unknown recipe {recipe!r}; built-in recipes are {sorted(BUILTIN_RECIPE_NAMES)}, or file:<path>")
    workers = spec.get("workers", 0)
    if not 1 <= workers <= settings.max_workers:
        _fail(f"workers must be between 1 and {settings.max_workers}, got {workers}")
    hp = spec.get("hyper_parameters", {})
    if hp.get("epochs", 1) < 1 or hp.get("batch_size", 32) < 1:
        _fail("epochs and batch_size must be at least 1")
    if hp.get("learning_rate", 1e-3) <= 0:
        _fail("learning_rate must be positive")
    if hp.get("optimizer", "adam") not in OPTIMIZERS:
        _fail(f"optimizer must be one of {list(OPTIMIZERS)}")
    if not 0 <= hp.get("validation_split", 0.2) < 1:
        _fail("validation_split must be in [0, 1)")
    if spec.get("max_restarts", 0) < 0:
        _fail("max_restarts must not be negative")
    for name in ("checkpoint_every_steps", "report_every_steps", "step_delay_ms", "hang_timeout_seconds"):
        if spec.get(name, 0) < 0:
            _fail(f"{name} must not be negative")
    if spec.get("register_model"):
        check_model_name(spec["register_model"])
    for alias in spec.get("register_aliases", []):
        check_alias(alias)
    if spec.get("register_aliases") and not spec.get("register_model"):
        _fail("register_aliases needs register_model")
    dataset = spec.get("dataset", {})
    if dataset.get("format") not in DATASET_FORMATS:
        _fail(f"dataset format must be one of {list(DATASET_FORMATS)}")
    if not dataset.get("blob_digest") and not dataset.get("local_path"):
        _fail("dataset needs blob_digest or local_path")


async def locate_dataset(
    spec: dict[str, Any], settings: TrainerSettings, registry: AsyncRegistryClient
) -> tuple[Path, str]:
    """The data set as a local file the agents can read, and its sha256. A registry blob is downloaded into the
    shared directory once."""
    dataset = spec["dataset"]
    if digest := dataset.get("blob_digest"):
        path = settings.shared_dir.resolve() / "datasets" / f"{digest}.{dataset['format']}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            try:
                await registry.download_blob(digest, partial)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    _fail(f"dataset blob {digest} is not in the registry (upload it with UploadBlob)")
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    _fail(f"dataset blob digest: {err.details()}")
                raise
            partial.rename(path)
    else:
        path = Path(dataset["local_path"]).resolve()
        if not path.is_file():
            _fail(f"dataset file {dataset['local_path']!r} does not exist (or is not a file)")
        digest = await asyncio.to_thread(file_digest, path)
    await asyncio.to_thread(_check_columns, path, dataset)
    return path, digest


def _check_columns(path: Path, dataset: dict[str, Any]) -> None:
    """The label and feature columns (CSV) or arrays (NPZ) named in the spec exist."""
    if dataset["format"] == "csv":
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        label = dataset.get("label_column") or "label"
        missing = [c for c in [label, *dataset.get("feature_columns", [])] if c not in header]
        if missing:
            _fail(f"dataset {path.name} has no column(s) {missing}; its columns are {header[:10]}...")
    elif dataset["format"] == "npz":
        try:
            with zipfile.ZipFile(path) as archive:
                arrays = {name.removesuffix(".npy") for name in archive.namelist()}
        except zipfile.BadZipFile:
            _fail(f"dataset {path.name} is not an NPZ file")
        for key in (dataset.get("features_key") or "x", dataset.get("label_key") or "y"):
            if key not in arrays:
                _fail(f"dataset {path.name} has no array {key!r}; it has {sorted(arrays)}")


def job_dir(settings: TrainerSettings, job: Job) -> Path:
    return settings.shared_dir.resolve() / "jobs" / job.id


def worker_spec(job: Job, settings: TrainerSettings) -> dict[str, Any]:
    """The spec every replica of `job` runs (services.trainer.worker.WorkerSpec as a dict)."""
    spec, hp, dataset = job.spec, job.spec.get("hyper_parameters", {}), job.spec["dataset"]
    worker_dataset: dict[str, Any] = {"format": dataset["format"], "path": job.dataset_path}
    for key in ("label_column", "features_key", "label_key"):
        if dataset.get(key):
            worker_dataset[key] = dataset[key]
    if dataset.get("feature_columns"):
        worker_dataset["feature_columns"] = dataset["feature_columns"]
    if dataset.get("num_classes"):
        worker_dataset["num_classes"] = dataset["num_classes"]
    base = job_dir(settings, job)
    return {
        "recipe": spec["recipe"],
        "recipe_params": spec.get("recipe_params", {}),
        "recipes_dir": str(settings.recipes_dir.resolve()),
        "dataset": worker_dataset,
        "checkpoint_dir": str(base / "checkpoints"),
        "export_dir": str(base / "export"),
        "epochs": hp.get("epochs", 1),
        "batch_size": hp.get("batch_size", 32),
        "learning_rate": hp.get("learning_rate", 1e-3),
        "optimizer": hp.get("optimizer", "adam"),
        "validation_split": hp.get("validation_split", 0.2),
        "seed": hp.get("seed", 0),
        "checkpoint_every_steps": spec.get("checkpoint_every_steps") or settings.default_checkpoint_every_steps,
        "report_every_steps": spec.get("report_every_steps") or settings.default_report_every_steps,
        "step_delay_ms": spec.get("step_delay_ms", 0),
        "record_shard_ids": settings.record_shard_ids,
    }
