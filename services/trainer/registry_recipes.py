"""Recipes registered in the registry: a job's `recipe: registry:<name>/<version>`, fetched, verified and cached
by the trainer at submit, and shipped to the workers like a file recipe (its source in the worker spec).

A registry recipe is a registered model tagged `modelgrid.kind=recipe` (KIND_TAG) whose versions are RAW
artifacts holding one module's Python source (the recipe contract: services/trainer/worker/contract.py). Only the
registry's ADMIN-scoped calls (CreateModel, CreateVersion) create one; the registry checks the source when a version
is created (services/registry/recipes.py). The trainer checks it again: the version's bytes must hash to its
recorded digest, fit `max_recipe_bytes`, and pass the same checks as a file recipe. The job keeps the digest, and
the trained version's lineage and params record it.

The verified source is kept in the trainer's scratch (`recipes/<digest>.py`), where each attempt's worker spec
reads it back (checking its digest again); a trainer on another host fetches it again before it starts the job.
"""

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from modelgrid.client.artifacts import check_digest
from modelgrid.client.errors import FailedPrecondition, InvalidArgument, NotFound
from modelgrid.client.modelref import ModelRef, check_model_name, shown
from modelgrid.client.registry import AsyncRegistryClient
from modelgrid.client.registry.types import KIND_TAG, RECIPE_KIND, ArtifactFormat, is_recipe
from services.trainer.settings import TrainerSettings

logger = logging.getLogger(__name__)

REGISTRY_PREFIX = "registry:"
"""A recipe named `registry:<model name>/<version number>` is that version of a recipe in the registry."""
"""The model tag that makes a registered model a recipe (the same in services/registry/recipes.py)."""
_REF = re.compile(r"registry:([^/]+)/([0-9]{1,18})")


@dataclass(frozen=True)
class RegistryRecipe:
    """One verified version of a registry recipe."""

    name: str
    version: int
    digest: str
    """sha256 of the source, as the registry records it for the version's artifact."""
    source: str

    @property
    def ref(self) -> str:
        return f"{REGISTRY_PREFIX}{self.name}/{self.version}"


def is_registry_recipe(recipe: str) -> bool:
    return recipe.startswith(REGISTRY_PREFIX)


def parse_recipe_ref(recipe: str) -> tuple[str, int]:
    """(model name, version) of `registry:<name>/<version>`; InvalidArgument otherwise."""
    match = _REF.fullmatch(recipe)
    if not match or int(match.group(2)) < 1:
        _invalid(
            f"recipe {shown(recipe)} must be registry:<name>/<version>, a recipe registered in the registry and "
            "a version number from 1"
        )
    try:
        name = check_model_name(match.group(1))
    except InvalidArgument as exc:
        _invalid(f"recipe: {exc}")
    return name, int(match.group(2))


def worker_recipe_name(recipe: str) -> str:
    """The `file:` name a registry recipe has in a worker spec: the agent writes its source there."""
    name, version = parse_recipe_ref(recipe)
    return f"file:registry/{name}/{version}.py"


def _invalid(message: str) -> NoReturn:
    raise InvalidArgument(f"invalid job spec: {message}")


def _cache_path(settings: TrainerSettings, digest: str) -> Path:
    check_digest(digest)  # before it names a file
    return settings.scratch_dir.resolve() / "recipes" / f"{digest}.py"


def _decode(data: bytes, ref: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise FailedPrecondition(f"recipe {ref} is not UTF-8 text") from None


async def fetch_recipe(recipe: str, registry: AsyncRegistryClient, settings: TrainerSettings) -> RegistryRecipe:
    """The recipe a job names, from the cache or the registry, its digest verified. InvalidArgument for a malformed
    reference, NotFound when the registry has no such model or version, FailedPrecondition when the model is not a
    recipe or its version cannot be one (format, size, not UTF-8)."""
    name, number = parse_recipe_ref(recipe)
    ref = f"{REGISTRY_PREFIX}{name}/{number}"
    try:
        model = await registry.get_model(name)
        version = await registry.resolve(ModelRef(name, version=number))
    except NotFound:
        raise NotFound(f"recipe {ref}: the registry has no model {name!r} with a READY version {number}") from None
    if not is_recipe(model.tags):
        raise FailedPrecondition(
            f"recipe {ref}: model {name!r} is not a recipe (an ADMIN registers recipes: a model tagged "
            f"{KIND_TAG}={RECIPE_KIND})"
        )
    artifact = version.artifact
    if artifact.format != ArtifactFormat.RAW:
        raise FailedPrecondition(f"recipe {ref}: its artifact is {artifact.format.value}, not Python source (RAW)")
    if artifact.size_bytes > settings.max_recipe_bytes:
        raise FailedPrecondition(
            f"recipe {ref} is {artifact.size_bytes} bytes, over the trainer's limit of {settings.max_recipe_bytes} "
            "(setting MODELGRID_TRAINER_MAX_RECIPE_BYTES)"
        )
    try:
        return cached_recipe(recipe, artifact.digest, settings)  # fetched before and still intact
    except InvalidArgument:
        pass
    path = _cache_path(settings, artifact.digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{artifact.digest}.{uuid.uuid4().hex[:8]}.partial")
    try:
        await registry.download_version(name, number, partial)  # verified against the version's digest
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("fetched recipe %s (%s, %d bytes)", ref, artifact.digest, artifact.size_bytes)
    return cached_recipe(recipe, artifact.digest, settings)


def cached_recipe(recipe: str, digest: str, settings: TrainerSettings) -> RegistryRecipe:
    """The recipe fetched at submit, from the trainer's scratch, its digest checked again; InvalidArgument when it
    is not there (the caller fetches it again with `fetch_recipe`)."""
    name, number = parse_recipe_ref(recipe)
    ref = f"{REGISTRY_PREFIX}{name}/{number}"
    path = _cache_path(settings, digest)
    try:
        data = path.read_bytes()
    except OSError:
        raise InvalidArgument(f"recipe {ref} ({digest}) is no longer in the trainer's scratch") from None
    if _digest(data) != digest:
        path.unlink(missing_ok=True)
        raise InvalidArgument(f"recipe {ref}: the trainer's copy no longer matches its digest {digest}")
    return RegistryRecipe(name, number, digest, _decode(data, ref))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
