"""Training recipes kept in the registry: a registered model tagged `modelgrid.kind=recipe` whose versions hold one
Python module's source each (a RAW artifact), checked before a version is committed.

A recipe model is created with the tag (CreateModel) and its versions with CreateVersion, both ADMIN-only at the
gateway; the tag cannot be added to, changed on or removed from an existing model (UpdateModel), so that no
version of a model becomes a recipe after the fact, and no recipe stops being checked. Each version's source must be
UTF-8, at most `max_recipe_bytes` (setting MODELGRID_REGISTRY_MAX_RECIPE_BYTES), parse as Python and define a
top-level `build_model` (the contract the trainer's workers follow: services/trainer/worker/contract.py). The
registry never imports or runs it. Errors name the check that failed, never the source's content.
"""

import ast
import logging
from pathlib import Path
from typing import BinaryIO

from modelgrid.client.errors import FailedPrecondition, InvalidArgument
from modelgrid.client.registry.types import KIND_TAG, RECIPE_KIND, ArtifactFormat, Signature

logger = logging.getLogger(__name__)


def check_kind_tag(value: str | None) -> None:
    """A model's kind tag, if given, names a kind this registry knows."""
    if value is not None and value != RECIPE_KIND:
        raise InvalidArgument(f"tag {KIND_TAG} may only be {RECIPE_KIND!r} (a training recipe)")


def check_kind_unchanged(set_tags: dict[str, str], remove_tags: list[str]) -> None:
    """UpdateModel may not make a model a recipe, or a recipe something else."""
    if KIND_TAG in set_tags or KIND_TAG in remove_tags:
        raise FailedPrecondition(
            f"tag {KIND_TAG} is set when a model is created and never changed: create a new model with "
            f"{KIND_TAG}={RECIPE_KIND} to register recipes"
        )


def check_recipe_format(artifact_format: ArtifactFormat) -> None:
    if artifact_format != ArtifactFormat.RAW:
        raise InvalidArgument("a recipe version's artifact is Python source: its format must be RAW")


def check_recipe_source(artifact: str | Path | BinaryIO, max_bytes: int) -> list[Signature]:
    """Checks a recipe version's bytes (a staged file's path, or an open blob); InvalidArgument saying which check
    failed. Returns no signatures (a recipe is not a SavedModel)."""
    if isinstance(artifact, str | Path):
        with open(artifact, "rb") as f:
            data = f.read(max_bytes + 1)
    else:
        data = artifact.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument(
            f"a recipe is at most {max_bytes} bytes of Python source (setting MODELGRID_REGISTRY_MAX_RECIPE_BYTES)"
        )
    try:
        source = data.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("a recipe must be UTF-8 Python source") from None
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise InvalidArgument(f"the recipe is not valid Python: {exc.msg} (line {exc.lineno})") from None
    except ValueError:  # NUL bytes
        raise InvalidArgument("the recipe is not valid Python: it holds NUL bytes") from None
    except (RecursionError, MemoryError):  # expressions nested thousands deep
        raise InvalidArgument("the recipe is nested too deeply for the Python parser") from None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "build_model" for node in tree.body):
        raise InvalidArgument(
            "the recipe defines no top-level function build_model(input_shape, num_outputs, **params)"
        )
    return []
