"""Entry point of the `modelgrid` command: global options, sub-commands, and how failures become exit codes.

    modelgrid [--target HOST:PORT] [--predictor HOST:PORT] [--trainer HOST:PORT] [--client-id ID] [--json] COMMAND ...

Every command talks to --target ($MODELGRID_TARGET, default 127.0.0.1:8080: the gateway `make up` starts, which
routes registry, predictor and trainer calls). --predictor and --trainer send those commands elsewhere (e.g.
straight to one predictor replica); they default to --target. `batch submit`/`batch fetch` and `jobs submit` with
`dataset.upload` also use --target, whose blob store keeps data sets and results. --api-key ($MODELGRID_API_KEY)
is sent as `authorization: Bearer <key>` when the gateway requires keys.

Exit codes: 0 success, 1 the command failed (a gRPC error prints `error: <CODE>: <details>`, and for UNAVAILABLE a
`hint:` line on what to check), 2 bad usage, 130 interrupted. Tests call `run(argv)`, which returns the code; the
console script calls `main()`.
"""

import argparse
import getpass
import logging
import os
import socket
import sys

import grpc

from services.cli import predictor_commands, registry_commands, trainer_commands
from services.cli.channels import open_channel
from services.cli.output import Output
from services.cli.predictor_commands import PredictorSession
from services.cli.registry_commands import CommandError, RegistrySession, UsageError
from services.cli.trainer_commands import TrainerSession
from services.clients.registry import RegistryClient
from services.kit import tls
from services.kit.errors import ModelgridError
from services.kit.interceptors import status_of

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 30.0
CLIENT_ID_HEADER = "x-modelgrid-client"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def default_client_id() -> str:
    """$MODELGRID_CLIENT_ID, else "cli:<user>@<hostname>"."""
    if os.environ.get("MODELGRID_CLIENT_ID"):
        return os.environ["MODELGRID_CLIENT_ID"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER, e.g. in some containers
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes. Sub-commands repeat them with SUPPRESS defaults, so they may be given
    before or after the command (`modelgrid --json models list` or `modelgrid models list --json`) without the
    sub-command's default overwriting the value given before it."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target",
        default=default(os.environ.get("MODELGRID_TARGET") or DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"gateway (or registry) address (env MODELGRID_TARGET, default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--predictor",
        default=default(os.environ.get("MODELGRID_PREDICTOR_TARGET") or None),
        metavar="HOST:PORT",
        help="predictor for predict, batch and serving (env MODELGRID_PREDICTOR_TARGET, default: --target)",
    )
    parser.add_argument(
        "--trainer",
        default=default(os.environ.get("MODELGRID_TRAINER_TARGET") or None),
        metavar="HOST:PORT",
        help="trainer for jobs and workers (env MODELGRID_TRAINER_TARGET, default: --target)",
    )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("MODELGRID_API_KEY", "")),
        metavar="KEY",
        help="API key for a gateway that requires one (env MODELGRID_API_KEY)",
    )
    parser.add_argument(
        "--tls-dir",
        default=default(os.environ.get("MODELGRID_TLS_DIR") or None),
        metavar="DIR",
        help="the mesh's certificates (python -m services.kit.tls): call the services directly over mTLS as "
        "`operator`; --target is then a registry (env MODELGRID_TLS_DIR; unset: plaintext, e.g. to the gateway)",
    )
    parser.add_argument(
        "--client-id",
        default=default(default_client_id()),
        metavar="ID",
        help="identity recorded in the audit trail (env MODELGRID_CLIENT_ID, default cli:<user>@<host>)",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print results as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT_S),
        metavar="SECONDS",
        help=f"deadline of each single call; uploads and downloads have none (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (reads MODELGRID_TARGET, MODELGRID_PREDICTOR_TARGET, MODELGRID_TRAINER_TARGET
    and MODELGRID_CLIENT_ID for defaults)."""
    parser = argparse.ArgumentParser(
        prog="modelgrid", description="Command-line client of the modelgrid registry, predictors and trainer."
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    registry_commands.add_parsers(commands, common)
    predictor_commands.add_parsers(commands, common)
    trainer_commands.add_parsers(commands, common)
    return parser


def _execute(args: argparse.Namespace, out: Output) -> None:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    logger.debug("connecting to %s as %s", args.target, args.client_id)
    internal = tls.from_dir(args.tls_dir, "operator")
    with open_channel(args.target, options, args.api_key, internal, "registry") as channel:
        client = RegistryClient(channel, client_id=args.client_id)
        metadata = ((CLIENT_ID_HEADER, args.client_id),) if args.client_id else ()
        session = RegistrySession(client, metadata, args.timeout, out)
        if getattr(args, "uses_trainer", False):
            logger.debug("trainer at %s", args.trainer)
            trainer_target = args.trainer or args.target
            with open_channel(trainer_target, options, args.api_key, internal, "trainer") as trainer_channel:
                args.handler(TrainerSession.over(session, trainer_channel), args)
            return
        if not getattr(args, "uses_predictor", False):
            args.handler(session, args)
            return
        logger.debug("predictor at %s", args.predictor)
        predictor_target = args.predictor or args.target
        with open_channel(predictor_target, options, args.api_key, internal, "predictor") as predictor_channel:
            args.handler(PredictorSession.over(session, predictor_channel), args)


_UNAVAILABLE_HINT = (
    "\nhint: the service is down, restarting or not at that address: check that it runs and that --target "
    "(MODELGRID_TARGET), --predictor or --trainer point at it (a service inside the mesh, not the gateway, also "
    "needs --tls-dir), then run the command again"
)


def _rpc_error_text(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name}: {details}{_UNAVAILABLE_HINT if code == grpc.StatusCode.UNAVAILABLE else ''}"


def run(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit code; never raises for a failed call or bad usage."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: bad usage (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    out = Output(json_mode=args.json)
    try:
        _execute(args, out)
    except grpc.RpcError as err:
        out.error(_rpc_error_text(err))
        return EXIT_FAILED
    except ModelgridError as exc:  # from the typed registry client: the call's status, as for a stub call
        cause = exc.__cause__
        out.error(_rpc_error_text(cause) if isinstance(cause, grpc.RpcError) else f"{status_of(exc).name}: {exc}")
        return EXIT_FAILED
    except UsageError as exc:
        out.error(str(exc))
        return EXIT_USAGE
    except (CommandError, OSError) as exc:
        out.error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the command and exits with its code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
