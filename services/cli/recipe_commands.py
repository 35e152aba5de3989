"""The recipe commands: register a training recipe (a Python module) in the registry, and list the recipes.

A recipe is a registered model tagged `modelgrid.kind=recipe` whose versions hold one module's source each (the
recipe contract: services/trainer/worker/contract.py); a job names one as `recipe: registry:NAME/VERSION`.
Registering needs an ADMIN key at the gateway (CreateModel and CreateVersion); the registry checks the source
(UTF-8, at most MODELGRID_REGISTRY_MAX_RECIPE_BYTES, parses as Python, defines build_model) before it keeps it.

    modelgrid recipes register regression-mlp examples/recipes/regression_mlp.py
    modelgrid recipes list
"""

import argparse
import logging
from pathlib import Path

from modelgrid.client.errors import AlreadyExists, InvalidArgument
from modelgrid.client.registry.types import KIND_TAG, RECIPE_KIND, is_recipe
from modelgrid.client.rpc_errors import rpc_errors
from modelgrid.registry.v1 import registry_pb2 as pb
from services.cli import arguments
from services.cli.arguments import command
from services.cli.registry_commands import MODEL_HINTS, CommandError, RegistrySession
from services.registry.recipes import check_recipe_source

logger = logging.getLogger(__name__)

"""The registry's tag of a recipe model (services/registry/recipes.py)."""
REGISTRY_PREFIX = "registry:"


def _read_source(path: Path) -> bytes:
    """The recipe's bytes, checked as the registry will check them (so a typo fails before anything is sent; the
    registry applies its own size limit)."""
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    try:
        check_recipe_source(path, path.stat().st_size)
    except InvalidArgument as exc:
        raise CommandError(f"{path}: {exc}") from None
    return path.read_bytes()


def _ensure_recipe_model(session: RegistrySession, name: str, description: str) -> None:
    """Creates the recipe model unless it exists; CommandError when a model of that name is not a recipe."""
    stub = session.client.stub
    request = pb.CreateModelRequest(name=name, description=description, tags={KIND_TAG: RECIPE_KIND})
    try:
        with rpc_errors("registry"):
            session.call(stub.CreateModel, request)
        return
    except AlreadyExists:
        pass
    model = session.call(stub.GetModel, pb.GetModelRequest(name=name))
    if not is_recipe(model.tags):
        raise CommandError(f"model {name} exists and is not a recipe: register the recipe under another name")


def register(session: RegistrySession, args: argparse.Namespace) -> None:
    path = Path(args.path)
    data = _read_source(path)
    _ensure_recipe_model(session, args.name, args.description)
    version = session.client.push_file(
        args.name, path, description=args.description or f"recipe {path.name}", timeout=session.timeout
    )
    if session.out.json_mode:
        session.out.message(
            pb.ModelVersion(
                model_name=version.model_name,
                version=version.version,
                artifact=pb.Artifact(digest=version.artifact.digest, size_bytes=version.artifact.size_bytes),
            )
        )
        return
    session.out.line(f"registered recipe {version.model_name}:{version.version} ({len(data)} bytes)")
    session.out.line(f"digest {version.artifact.digest}")
    session.out.line(f"use it in a job spec as   recipe: {REGISTRY_PREFIX}{version.model_name}/{version.version}")


def list_recipes(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.ListModelsRequest(tag=f"{KIND_TAG}={RECIPE_KIND}")
    models = list(session.pages(session.client.stub.ListModels, request, "models"))
    if session.out.json_mode:
        session.out.message(pb.ListModelsResponse(models=models))
        return
    if not models:
        session.out.line("no recipes (an ADMIN registers one with `modelgrid recipes register NAME FILE`)")
    for model in models:
        latest = f"{REGISTRY_PREFIX}{model.name}/{model.latest_version}" if model.latest_version else "(no version)"
        session.out.line(f"{model.name}\t{latest}\t{model.description}")


def add_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds `recipes register` and `recipes list` to `commands`."""
    parser = commands.add_parser("recipes", help="training recipes in the registry", description=__doc__.split("\n")[0])
    recipes = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    help_text = "register FILE as the next version of recipe NAME (needs an ADMIN key)"
    parser = command(recipes, "register", register, common, help_text, hints=MODEL_HINTS)
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("path", metavar="FILE", help="the recipe module's Python source")
    parser.add_argument("--description", default="", help="what the recipe builds")
    command(recipes, "list", list_recipes, common, "the recipes in the registry and their latest versions")
