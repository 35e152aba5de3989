"""Argument types of the CLI: each checks one command-line value and turns it into what the commands use.

A bad value raises argparse.ArgumentTypeError, so argparse reports it with the usage and exit code 2 before any
call reaches the registry. Names and references follow the registry's own rules (modelgrid.client.modelref).
"""

import argparse
import logging

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import ModelRef, check_alias, check_model_name

logger = logging.getLogger(__name__)


def model_name(text: str) -> str:
    """A registered model name."""
    try:
        return check_model_name(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def alias_name(text: str) -> str:
    """An alias name such as "production"."""
    try:
        return check_alias(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def model_ref(text: str) -> ModelRef:
    """ "name", "name:3" or "name@alias"."""
    try:
        return ModelRef.parse(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def version_number(text: str) -> int:
    """A version number, 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: expected a number >= 1")
    return int(text)


def expected_version(text: str) -> int:
    """A compare-and-set expectation: a version number, or 0 for "the alias must be unset"."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: expected a number >= 0 (0: unset)")
    return int(text)


def key_value(text: str) -> tuple[str, str]:
    """ "key=value" (the value may be empty or contain "=")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid pair {text!r}: expected key=value")
    return key, value


def metric(text: str) -> tuple[str, float]:
    """ "name=number", e.g. "accuracy=0.97"."""
    key, value = key_value(text)
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid metric {text!r}: the value must be a number") from None


def command(
    group: argparse._SubParsersAction,
    name: str,
    handler,
    common: argparse.ArgumentParser,
    help_text: str,
    **defaults,
) -> argparse.ArgumentParser:
    """A sub-command of `group` running `handler`, with the global options of `common` and the `defaults` the
    command's area sets (which service it talks to, the hints its errors get)."""
    parser = group.add_parser(name, parents=[common], help=help_text, description=help_text)
    parser.set_defaults(handler=handler, **defaults)
    return parser
