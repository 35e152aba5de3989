"""Tags of models and versions, and canary weights, which are a model tag the gateway follows.

The gateway sends a share of `NAME@production` calls to `NAME@canary`: the share is the model's tag
`modelgrid.canary-weight` (0..1), read from the registry and followed through its event stream, so `canary set`
and `canary rollback` are UpdateModel calls that apply on every gateway at once, and the audit trail records them.
"""

import argparse
import logging
import math

from modelgrid.registry.v1 import registry_pb2 as pb
from services.cli import arguments
from services.cli import tag_views as views
from services.cli.arguments import command
from services.cli.registry_commands import MODEL_HINTS, CommandError, Handler, RegistrySession, UsageError

logger = logging.getLogger(__name__)

CANARY_WEIGHT_TAG = "modelgrid.canary-weight"
"""The gateway's default MODELGRID_GATEWAY_CANARY_WEIGHT_TAG (tests/unit/cli checks that they agree)."""
STABLE_ALIAS, CANARY_ALIAS = "production", "canary"
"""The gateway's default MODELGRID_GATEWAY_STABLE_ALIAS and _CANARY_ALIAS."""


def weight(text: str) -> float:
    """A canary weight: a number from 0 to 1 (the share of calls)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"invalid weight {text!r}: expected a number from 0 to 1 (0.1 sends 10% of the calls to the canary)"
        )
    return value


def tag_key(text: str) -> str:
    """A tag key to remove (non-empty)."""
    if not text:
        raise argparse.ArgumentTypeError("a tag key cannot be empty")
    return text


# -- tags ----------------------------------------------------------------------------------------------------


def _update_tags(session: RegistrySession, args: argparse.Namespace, set_tags: dict[str, str], remove: list[str]):
    """UpdateModel, or UpdateVersion with --version: both add or overwrite `set_tags` and remove `remove` in one
    change; returns the model or version as it is now."""
    stub = session.client.stub
    if args.version:
        request = pb.UpdateVersionRequest(
            model_name=args.name, version=args.version, set_tags=set_tags, remove_tags=remove
        )
        return session.call(stub.UpdateVersion, request)
    return session.call(stub.UpdateModel, pb.UpdateModelRequest(name=args.name, set_tags=set_tags, remove_tags=remove))


def _show_tags(session: RegistrySession, args: argparse.Namespace, updated) -> None:
    if session.out.json_mode:
        session.out.message(updated)
        return
    what = f"{args.name}:{args.version}" if args.version else args.name
    session.out.line(f"{what} tags: {views.tags_text(updated.tags)}")


def tags_set(session: RegistrySession, args: argparse.Namespace) -> None:
    pairs = dict(args.pairs)
    if CANARY_WEIGHT_TAG in pairs and not args.version:
        raise UsageError(f"{CANARY_WEIGHT_TAG} routes traffic: set it with `modelgrid canary set` (it checks it)")
    _show_tags(session, args, _update_tags(session, args, pairs, []))


def tags_rm(session: RegistrySession, args: argparse.Namespace) -> None:
    _show_tags(session, args, _update_tags(session, args, {}, list(args.keys)))


# -- canary --------------------------------------------------------------------------------------------------


def _get_model(session: RegistrySession, name: str) -> pb.RegisteredModel:
    return session.call(session.client.stub.GetModel, pb.GetModelRequest(name=name))


def _set_weight(session: RegistrySession, name: str, value: float) -> tuple[float, pb.RegisteredModel]:
    """Sets the weight tag; returns the weight before and the model after."""
    before = views.canary_weight(_get_model(session, name).tags.get(CANARY_WEIGHT_TAG, ""))
    request = pb.UpdateModelRequest(name=name, set_tags={CANARY_WEIGHT_TAG: format(value, "g")})
    return before, session.call(session.client.stub.UpdateModel, request)


def _report(session: RegistrySession, model: pb.RegisteredModel, before: float | None = None) -> None:
    state = views.canary_state(model, CANARY_WEIGHT_TAG, STABLE_ALIAS, CANARY_ALIAS)
    if session.out.json_mode:
        session.out.json(state)
    else:
        session.out.render(views.canary_detail(state, before))


def canary_set(session: RegistrySession, args: argparse.Namespace) -> None:
    """Refuses a weight above 0 while the model has no canary alias: the gateway would send that share of the
    production calls to a version that does not exist, and they would fail."""
    model = _get_model(session, args.name)
    if args.weight > 0 and CANARY_ALIAS not in model.aliases:
        raise CommandError(
            f"{args.name} has no alias {CANARY_ALIAS!r}: point it at the version to try first "
            f"(modelgrid alias set {args.name} {CANARY_ALIAS} VERSION)"
        )
    before, model = _set_weight(session, args.name, args.weight)
    _report(session, model, before)


def canary_rollback(session: RegistrySession, args: argparse.Namespace) -> None:
    """Weight 0: every stable-alias call goes to the stable version again (the canary alias stays, to inspect)."""
    before, model = _set_weight(session, args.name, 0.0)
    _report(session, model, before)


def canary_show(session: RegistrySession, args: argparse.Namespace) -> None:
    _report(session, _get_model(session, args.name))


# -- parsers -------------------------------------------------------------------------------------------------


def _command(
    group: argparse._SubParsersAction, name: str, handler: Handler, common: argparse.ArgumentParser, help_text: str
) -> argparse.ArgumentParser:
    """A command on one model: its NAME comes first."""
    parser = command(group, name, handler, common, help_text, hints=MODEL_HINTS)
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    return parser


def _group(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(title="commands", metavar="COMMAND", required=True)


def add_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds `tags` and `canary` to `commands`; `common` carries the global options each command repeats."""
    tags = _group(commands, "tags", "tags of a model, or of one version")
    version_help = "the tags of version V instead of the model's"
    parser = _command(tags, "set", tags_set, common, "add or overwrite tags")
    parser.add_argument("pairs", type=arguments.key_value, nargs="+", metavar="KEY=VALUE")
    parser.add_argument("--version", type=arguments.version_number, metavar="V", help=version_help)
    parser = _command(tags, "rm", tags_rm, common, "remove tags (a key that is not there is no error)")
    parser.add_argument("keys", type=tag_key, nargs="+", metavar="KEY")
    parser.add_argument("--version", type=arguments.version_number, metavar="V", help=version_help)

    canary = _group(commands, "canary", f"share of NAME@{STABLE_ALIAS} calls the gateway sends to NAME@{CANARY_ALIAS}")
    parser = _command(canary, "set", canary_set, common, f"send WEIGHT (0..1) of the calls to NAME@{CANARY_ALIAS}")
    parser.add_argument("weight", type=weight, metavar="WEIGHT", help="0.1: 10%% of the calls; 0: none")
    _command(canary, "rollback", canary_rollback, common, f"weight 0: every call to NAME@{STABLE_ALIAS} again")
    _command(canary, "show", canary_show, common, "the weight and the versions of both aliases")
