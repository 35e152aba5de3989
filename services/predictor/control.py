"""Model control beside the Inference core: which models this replica serves, loading and unloading them, the
version a reference selects, and their load state as one typed view (ModelStatus) that every protocol reads.

The ModelRepository behind it (reconciliation against the registry, hot swaps) is private to the core: the
protocol servicers see only ModelControl and Inference.
"""

import asyncio
import logging
from collections.abc import Callable, Iterable

import numpy as np

from modelgrid.client.errors import NotFound, Unavailable
from modelgrid.client.modelref import ModelRef, check_model_name
from modelgrid.client.registry import AsyncRegistryClient
from services.predictor.batching import BatchingConfig, BatchObserver
from services.predictor.cache import ArtifactCache
from services.predictor.domain import ModelStatus, VersionPolicy, VersionState, VersionStatus
from services.predictor.repository import Barrier, Loader, ModelRepository, ServedModel, ServedVersion, no_barrier
from services.predictor.runtime import ModelSignature

logger = logging.getLogger(__name__)


def model_status(model: ServedModel) -> ModelStatus:
    """The view of one served model: the single place its load state is read."""
    return ModelStatus(
        name=model.name,
        policy=model.policy,
        versions=tuple(version_status(model, v) for _, v in sorted(model.versions.items(), reverse=True)),
        routes=dict(model.routes),
        reason=model.reason,
        settled=model.settled.is_set(),
    )


def version_status(model: ServedModel, version: ServedVersion) -> VersionStatus:
    """The view of one version of a served model."""
    available = version.state == VersionState.AVAILABLE
    return VersionStatus(
        model=model.name,
        version=version.version,
        state=version.state,
        reason=version.reason,
        aliases=tuple(sorted(alias for alias, number in model.routes.items() if number == version.version)),
        available_since=version.available_since if available else 0.0,
        signature=version.signature,
    )


class ModelControl:
    """Load, unload, status and version selection of the models this replica serves."""

    def __init__(
        self,
        registry: AsyncRegistryClient,
        cache: ArtifactCache,
        loader: Loader,
        batching: BatchingConfig,
        *,
        warmup_requests: int = 2,
        observer_for: Callable[[str, int], BatchObserver | None] = lambda name, version: None,
        barrier: Barrier = no_barrier,
    ) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._repository = ModelRepository(
            registry,
            cache,
            loader,
            batching,
            warmup_requests=warmup_requests,
            observer_for=observer_for,
            on_change=self._changed,
            barrier=barrier,
        )
        self._models = self._repository.models  # the same dict, read on every request

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every change of which versions serve and where the aliases route."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # -- version selection -------------------------------------------------------------------------------------

    def select(self, ref: ModelRef) -> ServedVersion:
        """The AVAILABLE version a reference routes to on this replica (for the Inference core): the exact
        version, the alias's route, or the newest available version. NotFound when the model, version or alias
        is not served here; Unavailable when the model has no available version."""
        model = self._models.get(ref.name)
        if model is None:
            raise NotFound(f"model {ref.name!r} is not served by this replica; it serves {sorted(self._models)}")
        if ref.version:
            chosen = model.versions.get(ref.version)
            if chosen is None or chosen.state != VersionState.AVAILABLE:
                loaded = [v.version for v in model.available()]
                raise NotFound(f"version {ref.version} of {ref.name!r} is not loaded here; loaded: {loaded}")
            return chosen
        if ref.alias:
            number = model.routes.get(ref.alias)
            if number is None:
                served = sorted(model.routes)
                raise NotFound(f"alias {ref.alias!r} of {ref.name!r} is not served here; served aliases: {served}")
            return model.versions[number]
        available = model.available()
        if not available:
            why = model.reason or "its versions are still loading"
            raise Unavailable(f"model {ref.name!r} has no available version: {why}")
        return available[0]

    def describe(self, ref: ModelRef) -> VersionStatus:
        """The status of the version `ref` selects (as `select`; for metadata calls)."""
        version = self.select(ref)
        return version_status(self._models[ref.name], version)

    def signature_of(self, ref: ModelRef) -> ModelSignature:
        """The signature of the version `ref` selects (as `select`), without building a status view: for the
        per-request check of a signature name."""
        return self.select(ref).signature

    def is_ready(self, ref: ModelRef) -> bool:
        """True when `ref` selects an AVAILABLE version here."""
        try:
            return self.select(ref).state == VersionState.AVAILABLE
        except (NotFound, Unavailable):
            return False

    def versions_of(self, ref: ModelRef) -> tuple[VersionStatus, ...]:
        """The versions a reference covers here, in any state, newest first: the exact version, the alias's
        route, or every version of the model. NotFound when there are none."""
        status = self.status(ref.name)
        versions = status.versions
        if ref.version:
            versions = tuple(v for v in versions if v.version == ref.version)
            if not versions:
                numbers = sorted(v.version for v in status.versions)
                raise NotFound(f"version {ref.version} of {ref.name!r} is not on this replica; it has {numbers}")
        elif ref.alias:
            if ref.alias not in status.routes:
                served = sorted(status.routes)
                raise NotFound(f"alias {ref.alias!r} of {ref.name!r} is not served here; served: {served}")
            versions = tuple(v for v in versions if v.version == status.routes[ref.alias])
        if not versions:
            raise NotFound(f"model {ref.name!r} has no versions on this replica: {status.reason or 'none loaded yet'}")
        return versions

    # -- status ------------------------------------------------------------------------------------------------

    def is_served(self, name: str) -> bool:
        return name in self._models

    def status(self, name: str) -> ModelStatus:
        """One served model's status; NotFound when this replica does not serve it."""
        model = self._models.get(check_model_name(name))
        if model is None:
            raise NotFound(f"model {name!r} is not served by this replica; it serves {sorted(self._models)}")
        return model_status(model)

    def index(self) -> list[ModelStatus]:
        """Every served model's status, by name."""
        return [model_status(model) for _, model in sorted(self._models.items())]

    async def wait_settled(self, names: Iterable[str]) -> None:
        """Waits until each of these served models has had its first reconciliation."""
        await asyncio.gather(*(self._models[name].settled.wait() for name in names if name in self._models))

    # -- control -----------------------------------------------------------------------------------------------

    async def load(
        self, name: str, policy: VersionPolicy | None = None, *, wait: bool, keep_if_empty: bool = True
    ) -> ModelStatus:
        """Serves `name` under `policy` (None: the policy it is served with, or the default one for a model not
        served yet), retrying failed versions. `wait` waits for the reconciliation. keep_if_empty=False: a model
        not served before that found no version at all is not kept (nothing to show for it)."""
        check_model_name(name)
        existing = self._models.get(name)
        if policy is None:
            policy = existing.policy if existing is not None else VersionPolicy()
        model = await self._repository.load(name, policy, wait)
        status = model_status(model)
        if not keep_if_empty and existing is None and not model.versions and self._models.get(name) is model:
            await self._repository.unload(name)
        return status

    async def unload(self, name: str) -> None:
        """Stops serving `name`; requests already running finish first. NotFound when it is not served."""
        await self._repository.unload(check_model_name(name))

    def refresh(self, name: str) -> None:
        """Reconciles a served model with the registry in the background (after a registry event)."""
        if name in self._models:
            self._repository.schedule(name)

    def refresh_all(self) -> None:
        """Reconciles every served model in the background (after the event stream reconnected)."""
        for name in list(self._models):
            self._repository.schedule(name)

    def record_sample(self, name: str, inputs: dict[str, np.ndarray]) -> None:
        """Keeps a small real request of `name` to warm its future versions up with."""
        self._repository.record_sample(name, inputs)

    async def close(self) -> None:
        """Stops background reconciliations and unloads every model."""
        await self._repository.close()
