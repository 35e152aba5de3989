"""The predictor's domain types: version policies, load states, and the read-only status views of the served
models that ModelControl hands to every protocol (so that each derives load state the same way)."""

import enum
from dataclasses import dataclass

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import check_alias
from services.predictor.runtime import ModelSignature


class VersionState(enum.StrEnum):
    """Where one version is in its life on this replica."""

    LOADING = "LOADING"
    PREPARED = "PREPARED"
    """Loaded and warmed up, not serving yet: waits for the replica's other processes (see ModelRepository)."""
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


class ModelState(enum.StrEnum):
    """A served model as a whole: LOADING until its first reconciliation, then AVAILABLE while at least one
    version serves, UNAVAILABLE otherwise (with the model's or its versions' reasons)."""

    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to keep loaded: the `latest` N, `versions` by number, or the targets of `aliases`."""

    latest: int = 0
    versions: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()
    all_aliases: bool = False  # also every alias the model has, whatever its name

    def __post_init__(self) -> None:
        chosen = sum(bool(x) for x in (self.latest, self.versions, self.aliases))
        if chosen > 1:
            raise InvalidArgument("a version policy takes one of latest, versions or aliases")
        if self.latest < 0 or any(v < 1 for v in self.versions):
            raise InvalidArgument("latest must be >= 1 and versions >= 1")
        for alias in self.aliases:
            check_alias(alias)

    @property
    def effective_latest(self) -> int:
        return self.latest or (0 if self.versions or self.aliases else 1)


@dataclass(frozen=True)
class VersionStatus:
    """One version of a served model as this replica sees it."""

    model: str
    version: int
    state: VersionState
    reason: str = ""
    aliases: tuple[str, ...] = ()
    """The aliases that route to this version here."""
    available_since: float = 0.0
    """Seconds since the epoch when it became AVAILABLE (0: not available)."""
    signature: ModelSignature | None = None
    """Known once the version has loaded."""

    @property
    def available(self) -> bool:
        return self.state == VersionState.AVAILABLE


@dataclass(frozen=True)
class ModelStatus:
    """A served model: its policy, its versions (newest first) and alias routes, and why part of it is missing."""

    name: str
    policy: VersionPolicy
    versions: tuple[VersionStatus, ...]
    routes: dict[str, int]
    """alias -> the version it routes to on this replica."""
    reason: str
    """Why part of the policy cannot be met (e.g. an alias that is not set, the registry unreachable)."""
    settled: bool
    """True once the model had its first reconciliation."""

    @property
    def available(self) -> tuple[VersionStatus, ...]:
        """The AVAILABLE versions, newest first."""
        return tuple(v for v in self.versions if v.available)

    @property
    def state(self) -> ModelState:
        if self.available:
            return ModelState.AVAILABLE
        return ModelState.UNAVAILABLE if self.settled else ModelState.LOADING

    @property
    def signature(self) -> ModelSignature | None:
        """The signature of the newest available version (what a request without a version runs on)."""
        available = self.available
        return available[0].signature if available else None

    def failure(self) -> str:
        """Why no version is available: the model's reason and each failed version's."""
        failures = [f"version {v.version}: {v.reason}" for v in self.versions if v.reason]
        parts = [self.reason, *failures] if self.reason else failures
        return "; ".join(parts) or "no version became available"
