"""How tags and canary weights are shown: one line of tags, and the canary's state as a grid or as JSON."""

import logging
import math
from collections.abc import Mapping

from rich.table import Table

from modelgrid.registry.v1 import registry_pb2 as pb
from services.cli.registry_views import _details, pairs_text

logger = logging.getLogger(__name__)


def tags_text(tags: Mapping[str, str]) -> str:
    """ "k=v, k=v" sorted by key, or "none"."""
    return pairs_text(tags) or "none"


def canary_weight(raw: str) -> float:
    """The weight a gateway reads from the tag's text: a number clamped to 0..1; 0 when unset or not a number
    (the gateway ignores such a value)."""
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        return 0.0
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0


def canary_state(model: pb.RegisteredModel, tag: str, stable: str, canary: str) -> dict[str, object]:
    """The canary of one model as plain data (the --json output): its weight and what both aliases point at
    (None: unset)."""
    return {
        "model": model.name,
        "weight": canary_weight(model.tags.get(tag, "")),
        "stable": {"alias": stable, "version": model.aliases.get(stable)},
        "canary": {"alias": canary, "version": model.aliases.get(canary)},
    }


def _alias_text(alias: Mapping[str, object]) -> str:
    version = alias["version"]
    return f"{alias['alias']} -> {version}" if version is not None else f"{alias['alias']} (unset)"


def canary_detail(state: Mapping[str, object], before: float | None = None) -> Table:
    """The canary's weight (with the weight before a change), and its two aliases."""
    weight = f"{state['weight']:g}"
    if before is not None:
        weight = f"{before:g} -> {weight}"
    share = f"{state['weight'] * 100:g}% of {state['model']}@{state['stable']['alias']} calls go to the canary"
    return _details(
        [
            ("model", str(state["model"])),
            ("weight", f"{weight} ({share})"),
            ("stable", _alias_text(state["stable"])),
            ("canary", _alias_text(state["canary"])),
        ]
    )
