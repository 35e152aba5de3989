"""How API keys look: one row per key, or one key in detail. Secrets are not shown here (keys_create prints the
one-time secret itself)."""

import logging
from collections.abc import Iterable

from rich.table import Table

from modelgrid.gateway.v1 import gateway_pb2 as pb
from services.cli.registry_views import _details, _table, timestamp_text

logger = logging.getLogger(__name__)


def scopes_text(scopes: Iterable[int]) -> str:
    """ "READ, PREDICT"."""
    return ", ".join(pb.Scope.Name(s).removeprefix("SCOPE_") for s in scopes)


def rate_text(rate: float) -> str:
    return f"{rate:g}/s" if rate else "default"


def key_detail(key: pb.ApiKey) -> Table:
    return _details(
        [
            ("id", key.id),
            ("name", key.name),
            ("scopes", scopes_text(key.scopes)),
            ("rate limit", rate_text(key.rate_limit)),
            ("created", timestamp_text(key.created_at)),
            ("revoked", "yes" if key.revoked else ""),
        ]
    )


def keys_table(keys: Iterable[pb.ApiKey]) -> Table:
    table = _table("ID", "NAME", "SCOPES", "RATE", "CREATED", "REVOKED")
    for key in keys:
        table.add_row(
            key.id,
            key.name,
            scopes_text(key.scopes),
            rate_text(key.rate_limit),
            timestamp_text(key.created_at),
            "yes" if key.revoked else "",
        )
    return table
