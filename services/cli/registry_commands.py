"""The registry commands: models, versions, push, pull, alias and history (tags and canary weights:
services.cli.tag_commands).

Each command is a function `(session, args) -> None` registered as the `handler` of its sub-parser. Commands
raise grpc.RpcError, CommandError or OSError; `services.cli.main` turns them into `error: ...` and exit code 1.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.modelref import ModelRef
from modelgrid.client.registry import RegistryClient, convert
from modelgrid.registry.v1 import registry_pb2 as pb
from services.cli import arguments
from services.cli import registry_views as views
from services.cli.arguments import command
from services.cli.output import Output

logger = logging.getLogger(__name__)

MODEL_HINTS = {grpc.StatusCode.NOT_FOUND: "`modelgrid models list` shows the registered models"}
"""What to do when a command on one model fails (main.run appends it to the error)."""
PAGE_SIZE = 200
"""Items asked for per list call; the registry may cap it lower (MODELGRID_REGISTRY_MAX_PAGE_SIZE)."""
SAVEDMODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


class CommandError(Exception):
    """The command cannot do what was asked (a missing local path, ...); the message says why."""


class UsageError(Exception):
    """The arguments parse but do not fit together; reported like an argparse error (exit code 2)."""


@dataclass
class RegistrySession:
    """What a command needs: the registry client, the call metadata and deadline, and where to write."""

    client: RegistryClient
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    out: Output

    def call(self, method: Callable[..., Message], request: Message) -> Message:
        """One unary RPC with the client identity and the deadline."""
        logger.debug("%s %s", type(request).__name__, request)
        return method(request, metadata=self.metadata, timeout=self.timeout)

    def pages(self, method: Callable[..., Message], request: Message, field: str) -> Iterator[Message]:
        """Every item of a paged list call, following next_page_token to the last page."""
        request.page.page_size = PAGE_SIZE
        while True:
            response = self.call(method, request)
            yield from getattr(response, field)
            token = response.page.next_page_token
            if not token:
                return
            request.page.page_token = token


Handler = Callable[[RegistrySession, argparse.Namespace], None]


# -- models --------------------------------------------------------------------------------------------------


def models_list(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.ListModelsRequest(name_prefix=args.prefix, tag=args.tag)
    models = list(session.pages(session.client.stub.ListModels, request, "models"))
    if session.out.json_mode:
        session.out.message(pb.ListModelsResponse(models=models))
    elif models:
        session.out.render(views.models_table(models))
    else:
        session.out.note("no models")


def models_show(session: RegistrySession, args: argparse.Namespace) -> None:
    model = session.call(session.client.stub.GetModel, pb.GetModelRequest(name=args.name))
    _show(session, model, views.model_detail)


def models_create(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.CreateModelRequest(name=args.name, description=args.description, tags=dict(args.tag))
    model = session.call(session.client.stub.CreateModel, request)
    if session.out.json_mode:
        session.out.message(model)
    else:
        session.out.line(f"created model {model.name}")


def models_update(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.UpdateModelRequest(name=args.name, description=args.description)
    model = session.call(session.client.stub.UpdateModel, request)
    if session.out.json_mode:
        session.out.message(model)
    else:
        session.out.line(f"updated model {model.name}")


def _confirm_delete(session: RegistrySession, args: argparse.Namespace) -> None:
    """Deleting drops every version's record at once, so without --yes a person types the model's name first;
    without a terminal to ask on (a script, a pipe) the command refuses rather than guess."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"deleting {args.name} cannot be undone: add --yes to confirm (stdin is not a terminal)")
    model = session.call(session.client.stub.GetModel, pb.GetModelRequest(name=args.name))  # NOT_FOUND first
    aliases = views.pairs_text(model.aliases) or "none"
    session.out.note(f"{model.name}: latest version {model.latest_version}, aliases: {aliases}")
    sys.stderr.write(f"delete {model.name} and all its versions? type its name to confirm: ")
    sys.stderr.flush()
    if sys.stdin.readline().strip() != model.name:  # the prompt on stderr keeps stdout for results
        raise CommandError("not deleted: the name typed did not match")


def models_delete(session: RegistrySession, args: argparse.Namespace) -> None:
    _confirm_delete(session, args)
    request = pb.DeleteModelRequest(name=args.name, force=args.force)
    response = session.call(session.client.stub.DeleteModel, request)
    if session.out.json_mode:
        session.out.message(response)
    else:
        session.out.line(f"deleted model {args.name} ({response.deleted_versions} version(s))")


# -- versions ------------------------------------------------------------------------------------------------


def versions_list(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.ListVersionsRequest(model_name=args.name)
    versions = list(session.pages(session.client.stub.ListVersions, request, "versions"))
    if session.out.json_mode:
        session.out.message(pb.ListVersionsResponse(versions=versions))
    elif versions:
        session.out.render(views.versions_table(versions))
    else:
        session.out.note(f"{args.name} has no versions")


def _version_ref(args: argparse.Namespace) -> ModelRef:
    """NAME:V, NAME@ALIAS or NAME (latest READY), or NAME V."""
    ref: ModelRef = args.ref
    if args.version is None:
        return ref
    if ref.version or ref.alias:
        raise UsageError(f"give the version once: {ref} already names one, drop {args.version}")
    return ModelRef(ref.name, version=args.version)


def versions_show(session: RegistrySession, args: argparse.Namespace) -> None:
    ref = _version_ref(args)
    stub = session.client.stub
    if ref.version:  # any status, archived included
        version = session.call(stub.GetVersion, pb.GetVersionRequest(model_name=ref.name, version=ref.version))
    else:  # latest READY or an alias target
        version = session.call(stub.Resolve, pb.ResolveRequest(ref=ref_to_pb(ref)))
    _show(session, version, views.version_detail)


# -- artifacts -----------------------------------------------------------------------------------------------


def _upload(session: RegistrySession, args: argparse.Namespace, path: Path) -> pb.ModelVersion:
    """Uploads a SavedModel directory (as a deterministic tar) or a plain file (raw) with a progress bar."""
    metadata = {
        "description": args.description,
        "metrics": dict(args.metric),
        "params": dict(args.param),
        "tags": dict(args.tag),
    }
    with session.out.transfer(f"push {args.name}") as progress:
        if path.is_dir():
            version = session.client.push_savedmodel(args.name, path, progress=progress, **metadata)
        else:
            version = session.client.push_file(args.name, path, progress=progress, **metadata)
    return convert.version_to_pb(version)


def _check_artifact_path(path: Path) -> None:
    """Refuses, before anything is created, a path that is neither a SavedModel directory nor a file."""
    if path.is_dir():
        if not any((path / name).is_file() for name in SAVEDMODEL_FILES):
            raise CommandError(f"{path} is a directory without saved_model.pb: not a SavedModel")
    elif not path.is_file():
        raise CommandError(f"{path} does not exist or is not a regular file or directory")


def push(session: RegistrySession, args: argparse.Namespace) -> None:
    path = Path(args.path)
    _check_artifact_path(path)
    session.client.ensure_model(args.name)
    version = _upload(session, args, path)
    if args.alias:
        request = pb.SetAliasRequest(model_name=args.name, alias=args.alias, version=version.version)
        session.call(session.client.stub.SetAlias, request)
        request = pb.GetVersionRequest(model_name=args.name, version=version.version)
        version = session.call(session.client.stub.GetVersion, request)  # now lists the alias
    if session.out.json_mode:
        session.out.message(version)
        return
    artifact = version.artifact
    session.out.line(f"pushed {version.model_name}:{version.version}")
    session.out.line(f"digest {artifact.digest} ({artifact.size_bytes} bytes, {views.format_name(artifact.format)})")
    if args.alias:
        session.out.line(f"alias {version.model_name}@{args.alias} -> {version.version}")


def pull(session: RegistrySession, args: argparse.Namespace) -> None:
    directory = Path(args.directory)
    created = not directory.exists()
    try:
        with session.out.transfer(f"pull {args.ref}") as progress:
            header = session.client.pull(args.ref, directory, progress=progress)
    except BaseException:
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # leave no empty directory behind a failed pull
        raise
    if session.out.json_mode:
        session.out.message(convert.download_to_pb(header))
        return
    artifact = header.artifact
    session.out.line(f"pulled {header.model_name}:{header.version} into {directory}")
    session.out.line(f"digest {artifact.digest} verified ({artifact.size_bytes} bytes)")


# -- aliases and history -------------------------------------------------------------------------------------


def alias_set(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.SetAliasRequest(model_name=args.name, alias=args.alias, version=args.version)
    if args.expect is not None:
        request.expected_version = args.expect
    alias = session.call(session.client.stub.SetAlias, request)
    if session.out.json_mode:
        session.out.message(alias)
        return
    before = alias.previous_version or "unset"
    session.out.line(f"{alias.model_name}@{alias.alias}: {before} -> {alias.version}")


def alias_rm(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.DeleteAliasRequest(model_name=args.name, alias=args.alias)
    response = session.call(session.client.stub.DeleteAlias, request)
    if session.out.json_mode:
        session.out.message(response)
    else:
        session.out.line(f"removed {args.name}@{args.alias} (was {response.previous_version})")


def history(session: RegistrySession, args: argparse.Namespace) -> None:
    request = pb.GetHistoryRequest(model_name=args.name, alias=args.alias or "", version=args.version)
    events = list(session.pages(session.client.stub.GetHistory, request, "events"))
    if session.out.json_mode:
        session.out.message(pb.GetHistoryResponse(events=events))
    elif events:
        session.out.render(views.events_table(events))
    else:
        session.out.note("no matching events")


def _show(session: RegistrySession, message: Message, detail: Callable[[Message], object]) -> None:
    if session.out.json_mode:
        session.out.message(message)
    else:
        session.out.render(detail(message))


# -- parsers -------------------------------------------------------------------------------------------------


def _group(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(title="commands", metavar="COMMAND", required=True)


def _add_models(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = _group(commands, "models", "registered models")
    parser = command(models, "list", models_list, common, "list models (all pages)")
    parser.add_argument("--prefix", default="", metavar="P", help="only names starting with P")
    parser.add_argument("--tag", default="", metavar="K[=V]", help="only models with tag K (set to V)")
    parser = command(models, "show", models_show, common, "show one model")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser = command(models, "create", models_create, common, "register a new model")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("--description", default="", metavar="D")
    parser.add_argument("--tag", type=arguments.key_value, action="append", default=[], metavar="K=V")
    parser = command(models, "update", models_update, common, "change a model's description")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("--description", required=True, metavar="D", help="the new description ('' clears it)")
    parser.set_defaults(hints=MODEL_HINTS)
    parser = command(models, "delete", models_delete, common, "delete a model and its versions' records")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("--yes", action="store_true", help="do not ask (required when stdin is not a terminal)")
    parser.add_argument("--force", action="store_true", help="delete even while aliases point at its versions")
    hints = {grpc.StatusCode.FAILED_PRECONDITION: "remove its aliases first (modelgrid alias rm) or add --force"}
    parser.set_defaults(hints={**MODEL_HINTS, **hints})


def _add_versions(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    versions = _group(commands, "versions", "versions of a model")
    parser = command(versions, "list", versions_list, common, "list a model's versions, newest first")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser = command(versions, "show", versions_show, common, "show one version with its signatures")
    parser.add_argument("ref", type=arguments.model_ref, metavar="NAME[:V|@ALIAS]")
    parser.add_argument("version", type=arguments.version_number, nargs="?", metavar="V")


def _add_artifacts(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = command(commands, "push", push, common, "upload a SavedModel directory or a file as a new version")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME", help="created when missing")
    parser.add_argument("path", metavar="DIR", help="SavedModel directory (or a plain file, pushed raw)")
    parser.add_argument("--description", default="", metavar="D")
    parser.add_argument("--metric", type=arguments.metric, action="append", default=[], metavar="K=V")
    parser.add_argument("--param", type=arguments.key_value, action="append", default=[], metavar="K=V")
    parser.add_argument("--tag", type=arguments.key_value, action="append", default=[], metavar="K=V")
    parser.add_argument("--alias", type=arguments.alias_name, metavar="A", help="point alias A at the new version")
    parser = command(commands, "pull", pull, common, "download a version into a directory, digest verified")
    parser.add_argument("ref", type=arguments.model_ref, metavar="NAME[:V|@ALIAS]")
    parser.add_argument("directory", metavar="DIR")


def _add_aliases(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    aliases = _group(commands, "alias", "aliases such as production or canary")
    parser = command(aliases, "set", alias_set, common, "point an alias at a version")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("alias", type=arguments.alias_name, metavar="ALIAS")
    parser.add_argument("version", type=arguments.version_number, metavar="VERSION")
    parser.add_argument(
        "--expect",
        type=arguments.expected_version,
        metavar="N",
        help="compare-and-set: only if the alias now points at N (0: only if unset)",
    )
    parser = command(aliases, "rm", alias_rm, common, "remove an alias")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("alias", type=arguments.alias_name, metavar="ALIAS")
    parser = command(commands, "history", history, common, "audit trail of a model, oldest first")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser.add_argument("--alias", type=arguments.alias_name, metavar="A", help="only events of A")
    parser.add_argument("--version", type=arguments.version_number, default=0, metavar="V", help="only events of V")


def add_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds every registry command to `commands`; `common` carries the global options each command repeats."""
    _add_models(commands, common)
    _add_versions(commands, common)
    _add_artifacts(commands, common)
    _add_aliases(commands, common)
