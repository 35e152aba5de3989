"""Model names, alias names and model references ("name", "name:3", "name@production"): parsing and rules."""

import re
from dataclasses import dataclass

from modelgrid.client.errors import InvalidArgument

MODEL_NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ALIAS_RULE = r"^[a-z][a-z0-9_-]{0,62}$"
_MODEL_NAME = re.compile(MODEL_NAME_RULE)
_ALIAS = re.compile(ALIAS_RULE)


def shown(value: str, limit: int = 64) -> str:
    """A caller's value quoted for an error message, cut to `limit` characters."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def check_model_name(name: str) -> str:
    """Returns `name` if it is a valid model name, else raises InvalidArgument saying what is allowed."""
    if not name:
        raise InvalidArgument("model name is empty")
    if not _MODEL_NAME.fullmatch(name) or ".." in name:  # fullmatch: "$" would let a trailing newline in
        raise InvalidArgument(
            f"invalid model name {shown(name)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, without '..'"
        )
    return name


def check_alias(alias: str) -> str:
    """Returns `alias` if it is a valid alias name, else raises InvalidArgument."""
    if not _ALIAS.fullmatch(alias or ""):
        raise InvalidArgument(
            f"invalid alias {shown(alias)}: use 1-63 lower-case letters, digits, '_' or '-', starting with a letter"
        )
    return alias


@dataclass(frozen=True)
class ModelRef:
    """A model version reference: the latest READY version, an exact number, or an alias."""

    name: str
    version: int = 0
    alias: str = ""

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}:{self.version}"
        if self.alias:
            return f"{self.name}@{self.alias}"
        return self.name

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        """Parses "name", "name:3" or "name@alias"."""
        if "@" in text:
            name, alias = text.split("@", 1)
            return cls(check_model_name(name), alias=check_alias(alias))
        if ":" in text:
            name, number = text.split(":", 1)
            if not number.isdigit() or int(number) < 1:
                raise InvalidArgument(f"invalid version in {text!r}: expected a number >= 1")
            return cls(check_model_name(name), version=int(number))
        return cls(check_model_name(text))
