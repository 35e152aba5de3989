"""Entry point of the `modelgrid` command: global options, sub-commands, and how failures become exit codes.

    modelgrid [--target HOST:PORT] [--predictor HOST:PORT] [--trainer HOST:PORT] [--api-key KEY] [--tls] [--ca FILE]
              [--tls-dir DIR] [--profile NAME] [--config FILE] [--client-id ID] [--json] COMMAND ...

Every command talks to --target (default 127.0.0.1:8080: the gateway `make up` starts, which routes registry,
predictor and trainer calls). --predictor and --trainer send those commands elsewhere (e.g. straight to one
predictor replica); they default to --target. `batch submit`/`batch fetch` and `jobs submit` with `dataset.upload`
also use --target, whose blob store keeps data sets and results. --api-key is sent as `authorization: Bearer <key>`
when the gateway requires keys. Each connection option comes from its flag, else its environment variable, else
the profile of the config file, else its default (services.cli.config).

Exit codes: 0 success, 1 the command failed (a gRPC error prints `error: <CODE>: <details>` and, where there is
one, a `hint:` line on what to do), 2 bad usage or a config file that cannot be used, 130 interrupted. Tests call
`run(argv)`, which returns the code; the console script calls `main()`.
"""

import argparse
import logging
import os
import sys
from collections.abc import Mapping

import grpc

from modelgrid.client.channels import channel_options
from modelgrid.client.errors import ModelgridError
from modelgrid.client.registry import RegistryClient
from services.cli import (
    completion,
    config,
    gateway_commands,
    predictor_commands,
    recipe_commands,
    registry_commands,
    tag_commands,
    trainer_commands,
)
from services.cli.channels import open_channel, public_tls
from services.cli.gateway_commands import GatewaySession
from services.cli.output import Output
from services.cli.predictor_commands import PredictorSession
from services.cli.registry_commands import CommandError, RegistrySession, UsageError
from services.cli.trainer_commands import TrainerSession
from services.kit import tls
from services.kit.interceptors import status_of

logger = logging.getLogger(__name__)

CLIENT_ID_HEADER = "x-modelgrid-client"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes. Sub-commands repeat them with SUPPRESS defaults, so they may be given
    before or after the command (`modelgrid --json models list` or `modelgrid models list --json`) without the
    sub-command's default overwriting the value given before it. A connection option left unset is None here:
    services.cli.config then takes the environment, the profile, or the default, in that order."""

    def default(value: object = None) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target",
        default=default(),
        metavar="HOST:PORT",
        help=f"gateway (or registry) address (env MODELGRID_TARGET, default {config.DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--predictor",
        default=default(),
        metavar="HOST:PORT",
        help="predictor for predict, batch and serving (env MODELGRID_PREDICTOR_TARGET, default: --target)",
    )
    parser.add_argument(
        "--trainer",
        default=default(),
        metavar="HOST:PORT",
        help="trainer for jobs and workers (env MODELGRID_TRAINER_TARGET, default: --target)",
    )
    parser.add_argument(
        "--api-key",
        default=default(),
        metavar="KEY",
        help="API key for a gateway that requires one (env MODELGRID_API_KEY)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=default(),
        help="TLS to a gateway whose public ports have a certificate, trusting the system's roots (env "
        "MODELGRID_TLS; default: on when --ca is given)",
    )
    parser.add_argument(
        "--ca",
        default=default(),
        metavar="FILE",
        help="PEM certificate(s) of the private CA that signed the gateway's certificate; implies --tls (env "
        "MODELGRID_CA)",
    )
    parser.add_argument(
        "--tls-dir",
        default=default(),
        metavar="DIR",
        help="the mesh's certificates (python -m services.kit.tls): call the services directly over mTLS as "
        "`operator`; --target is then a registry (env MODELGRID_TLS_DIR; unset: the gateway)",
    )
    parser.add_argument(
        "--client-id",
        default=default(),
        metavar="ID",
        help="identity recorded in the audit trail (env MODELGRID_CLIENT_ID, default cli:<user>@<host>)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(),
        metavar="SECONDS",
        help=f"deadline of each single call; uploads and downloads have none (env MODELGRID_TIMEOUT, default "
        f"{config.DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--profile",
        default=default(),
        metavar="NAME",
        help=f"profile of the config file to use (env {config.PROFILE_ENV}, default: the profile named default)",
    )
    parser.add_argument(
        "--config",
        default=default(),
        metavar="FILE",
        help=f"config file with [profiles.NAME] (env {config.CONFIG_ENV}, default ~/.config/modelgrid/config.toml)",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print results as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (it reads no environment: services.cli.config does, after parsing)."""
    parser = argparse.ArgumentParser(
        prog="modelgrid", description="Command-line client of the modelgrid registry, predictors and trainer."
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    registry_commands.add_parsers(commands, common)
    tag_commands.add_parsers(commands, common)
    recipe_commands.add_parsers(commands, common)
    predictor_commands.add_parsers(commands, common)
    trainer_commands.add_parsers(commands, common)
    gateway_commands.add_parsers(commands, common)
    completion.add_parser(commands, build_parser)
    return parser


def settings_of(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Fills the connection settings of `args` by precedence (flag > environment > profile > default) and checks
    that they fit together; raises config.ConfigError or UsageError."""
    path, named = config.config_path(args.config, environ)
    profile_name = args.profile or environ.get(config.PROFILE_ENV) or None
    profile = config.load_profile(path, named, profile_name)
    logger.debug("config file %s, profile %s: %s", path, profile_name or config.DEFAULT_PROFILE, sorted(profile))
    values = config.resolve(vars(args), environ, profile)
    vars(args).update(values)
    if args.tls is None:
        args.tls = bool(args.ca)
    if args.tls_dir and args.tls:
        raise UsageError(
            "--tls/--ca reach a gateway's public port, --tls-dir a service inside the mesh over mTLS: give one "
            "(check MODELGRID_TLS, MODELGRID_CA, MODELGRID_TLS_DIR and the profile too)"
        )
    if args.ca and not args.tls:
        raise UsageError("--ca is for TLS: drop --no-tls (or MODELGRID_TLS=false, tls = false in the profile)")
    if getattr(args, "uses_gateway", False) and args.tls_dir:
        raise UsageError("API keys are managed on the gateway: drop --tls-dir and point --target at a gateway")


def _execute(args: argparse.Namespace, out: Output) -> None:
    options = channel_options(max_message_bytes=MAX_MESSAGE_BYTES)  # with retries of the idempotent calls
    logger.debug("connecting to %s as %s (tls %s)", args.target, args.client_id, args.tls)
    internal = tls.from_dir(args.tls_dir, "operator")
    try:
        public = public_tls(args.ca) if args.tls else None
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    def channel_to(target: str, service: str) -> grpc.Channel:
        return open_channel(target, options, args.api_key, internal, service, public)

    with channel_to(args.target, "registry") as channel:
        client = RegistryClient(channel, client_id=args.client_id)
        metadata = ((CLIENT_ID_HEADER, args.client_id),) if args.client_id else ()
        session = RegistrySession(client, metadata, args.timeout, out)
        if getattr(args, "uses_gateway", False):
            args.handler(GatewaySession.over(session, channel), args)
        elif getattr(args, "uses_trainer", False):
            logger.debug("trainer at %s", args.trainer)
            with channel_to(args.trainer or args.target, "trainer") as trainer_channel:
                args.handler(TrainerSession.over(session, trainer_channel), args)
        elif getattr(args, "uses_predictor", False):
            logger.debug("predictor at %s", args.predictor)
            with channel_to(args.predictor or args.target, "predictor") as predictor_channel:
                args.handler(PredictorSession.over(session, predictor_channel), args)
        else:
            args.handler(session, args)


HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        "the service is down, restarting or not at that address: check that it runs and that --target "
        "(MODELGRID_TARGET), --predictor or --trainer point at it (a service inside the mesh, not the gateway, also "
        "needs --tls-dir; a gateway with a certificate needs --tls, and --ca FILE when a private CA signed it), "
        "then run the command again"
    ),
    grpc.StatusCode.UNAUTHENTICATED: (
        "the gateway requires a valid API key: give one with --api-key, MODELGRID_API_KEY or api_key in a profile "
        "(`modelgrid keys create` makes one, with an ADMIN key)"
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        "the API key lacks the scope this call needs (the message names it): use a key that has it"
    ),
}
"""What a user can do about a status, whatever the command; a command may add its own (`hints` default)."""


def _rpc_error_text(err: grpc.RpcError, hints: dict[grpc.StatusCode, str]) -> str:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    hint = hints.get(code) or HINTS.get(code)
    return f"{code.name}: {details}" + (f"\nhint: {hint}" if hint else "")


def run(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit code; never raises for a failed call or bad usage."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: bad usage (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    out = Output(json_mode=args.json)
    if getattr(args, "offline", False):  # e.g. completion: needs no connection, so no settings either
        args.handler(out, args)
        return EXIT_OK
    hints = getattr(args, "hints", {})
    try:
        settings_of(args, os.environ)
        _execute(args, out)
    except grpc.RpcError as err:
        out.error(_rpc_error_text(err, hints))
        return EXIT_FAILED
    except ModelgridError as exc:  # from the typed registry client: the call's status, as for a stub call
        cause = exc.__cause__
        text = _rpc_error_text(cause, hints) if isinstance(cause, grpc.RpcError) else f"{status_of(exc).name}: {exc}"
        out.error(text)
        return EXIT_FAILED
    except (UsageError, config.ConfigError) as exc:
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
