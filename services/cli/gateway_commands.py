"""The gateway's own commands: API keys (modelgrid.gateway.v1.GatewayAdmin), which only an ADMIN key manages.

A key's secret exists in clear only in CreateApiKey's answer (the gateway stores a hash): `keys create` prints it
once, on stdout, and nothing else ever prints a secret.
"""

import argparse
import functools
import logging
from collections.abc import Callable

import grpc

from modelgrid.gateway.v1 import gateway_pb2 as pb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from services.cli import gateway_views as views
from services.cli.arguments import command
from services.cli.sessions import StubSession

logger = logging.getLogger(__name__)

SCOPES = ("read", "predict", "train", "admin")
HINTS = {
    grpc.StatusCode.PERMISSION_DENIED: "only an ADMIN key manages keys: give one with --api-key (MODELGRID_API_KEY)",
    grpc.StatusCode.NOT_FOUND: "`modelgrid keys list` shows the key ids",
    grpc.StatusCode.UNIMPLEMENTED: "--target is not a gateway: point it at the gateway's gRPC port",
}


class GatewaySession(StubSession):
    """The GatewayAdmin stub on the --target channel, next to the registry session."""

    stub_class = gateway_pb2_grpc.GatewayAdminStub


Handler = Callable[[GatewaySession, argparse.Namespace], None]


def scope(text: str) -> int:
    """READ, PREDICT, TRAIN or ADMIN, in any case."""
    if text.lower() not in SCOPES:
        raise argparse.ArgumentTypeError(f"invalid scope {text!r}: one of {', '.join(SCOPES)}")
    return pb.Scope.Value(f"SCOPE_{text.upper()}")


scope.completions = SCOPES  # what shell completion offers (services.cli.completion)


def rate(text: str) -> float:
    """Requests per second, a number >= 0 (0: the gateway's default); the gateway checks its bounds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: requests per second, 0 for the gateway's default")
    return value


def keys_create(session: GatewaySession, args: argparse.Namespace) -> None:
    request = pb.CreateApiKeyRequest(name=args.name, scopes=sorted(set(args.scope)), rate_limit=args.rate_limit)
    response = session.call(session.stub.CreateApiKey, request)
    if session.out.json_mode:
        session.out.message(response)  # the secret is in it: this is its only appearance
    else:
        session.out.render(views.key_detail(response.key))
        session.out.line(f"secret: {response.secret}")
    session.out.note("the secret is shown only now (the gateway keeps a hash): store it where only you can read it")


def keys_list(session: GatewaySession, args: argparse.Namespace) -> None:
    response = session.call(session.stub.ListApiKeys, pb.ListApiKeysRequest())
    keys = [key for key in response.keys if args.all or not key.revoked]
    if session.out.json_mode:
        session.out.message(pb.ListApiKeysResponse(keys=keys))
    elif keys:
        session.out.render(views.keys_table(keys))
    else:
        session.out.note("no keys" if args.all else "no keys in use (--all lists revoked keys too)")


def keys_revoke(session: GatewaySession, args: argparse.Namespace) -> None:
    key = session.call(session.stub.RevokeApiKey, pb.RevokeApiKeyRequest(id=args.id))
    if session.out.json_mode:
        session.out.message(key)
    else:
        session.out.line(f"revoked key {key.id} ({key.name})")


_command = functools.partial(command, uses_gateway=True, hints=HINTS)


def add_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds `keys` to `commands`; `common` carries the global options each command repeats."""
    group = commands.add_parser("keys", help="the gateway's API keys", description="the gateway's API keys (ADMIN)")
    keys = group.add_subparsers(title="commands", metavar="COMMAND", required=True)
    parser = _command(keys, "create", keys_create, common, "make a key; its secret is printed once")
    parser.add_argument(
        "--scope", type=scope, action="append", required=True, metavar="SCOPE", help=f"repeatable: {', '.join(SCOPES)}"
    )
    parser.add_argument("--name", required=True, metavar="NAME", help="who uses it (the audit trail's identity)")
    parser.add_argument(
        "--rate-limit", type=rate, default=0.0, metavar="N", help="requests per second (default: the gateway's)"
    )
    parser = _command(keys, "list", keys_list, common, "list keys (never their secrets)")
    parser.add_argument("--all", action="store_true", help="revoked keys too")
    parser = _command(keys, "revoke", keys_revoke, common, "revoke a key on every gateway")
    parser.add_argument("id", metavar="ID")
