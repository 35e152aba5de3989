"""Writes docs/settings.md, the reference of every service setting, from the settings classes themselves (field
types, defaults and docstrings), so that the reference cannot drift from the code.

    python scripts/settings_reference.py            # rewrite docs/settings.md
    python scripts/settings_reference.py --check    # exit 1 when docs/settings.md is out of date (a test runs it)
"""

import argparse
import sys
import types
import typing
from enum import Enum
from pathlib import Path

from pydantic_core import PydanticUndefined

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from services.gateway.settings import GatewaySettings  # noqa: E402
from services.kit.settings import ReplicaSettings, ServiceSettings  # noqa: E402
from services.predictor.settings import PredictorSettings  # noqa: E402
from services.registry.settings import RegistrySettings  # noqa: E402
from services.trainer.agent.settings import AgentSettings  # noqa: E402
from services.trainer.settings import TrainerSettings  # noqa: E402

OUTPUT = REPO_ROOT / "docs" / "settings.md"
SERVICES = [
    ("registry", RegistrySettings),
    ("predictor", PredictorSettings),
    ("trainer", TrainerSettings),
    ("worker agent", AgentSettings),
    ("gateway", GatewaySettings),
]


def type_text(annotation) -> str:
    """A short, readable form of a field's type: `int`, `"none" | "console"`, `Path | unset`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f'"{choice}"' for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("unset" if a is type(None) else type_text(a) for a in typing.get_args(annotation))
    if origin is not None:
        inner = ", ".join(type_text(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if value == sys.executable or (isinstance(value, list) and sys.executable in value):
        # The interpreter's path differs per checkout; say what it is rather than where it was here.
        value = (
            [("<the service's python>" if v == sys.executable else v) for v in value]
            if isinstance(value, list)
            else "<the service's python>"
        )
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str | Path):
        return f'`"{value}"`' if str(value) == "" else f"`{value}`"
    return f"`{value!r}`"


def rows(settings_class, fields: list[str], prefix: str) -> list[str]:
    lines = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for name in fields:
        field = settings_class.model_fields[name]
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(
            f"| `{prefix}{name.upper()}` | {type_text(field.annotation)} | {default_text(field)} | {description} |"
        )
    return lines


def reference() -> str:
    common = list(ServiceSettings.model_fields)
    replica = [name for name in ReplicaSettings.model_fields if name not in common]
    out = [
        "# Settings reference",
        "",
        "Every setting is an environment variable with the service's prefix (`MODELGRID_REGISTRY_PORT=50051`).",
        "Generated from the settings classes by `make settings-doc` (scripts/settings_reference.py); a test fails",
        "when this file is out of date.",
        "",
        "## Every service",
        "",
        "With the service's prefix: `MODELGRID_REGISTRY_`, `MODELGRID_PREDICTOR_`, `MODELGRID_TRAINER_`,",
        "`MODELGRID_AGENT_`, `MODELGRID_GATEWAY_` (services/kit/settings.py).",
        "",
        *rows(ServiceSettings, common, "<PREFIX>"),
        "",
        "## Replicas of several processes (predictor, gateway)",
        "",
        *rows(ReplicaSettings, replica, "<PREFIX>"),
    ]
    for title, settings_class in SERVICES:
        prefix = settings_class.model_config["env_prefix"]
        own = [name for name in settings_class.model_fields if name not in common and name not in replica]
        source = Path(sys.modules[settings_class.__module__].__file__).relative_to(REPO_ROOT)
        out += ["", f"## {title} (`{prefix}*`, {source})", "", *rows(settings_class, own, prefix)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/settings.md is out of date")
    args = parser.parse_args()
    text = reference()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            sys.exit(f"{OUTPUT.relative_to(REPO_ROOT)} is out of date: run `make settings-doc`")
        return
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
