"""The models a predictor replica serves: which versions are loaded, which alias routes to which version, and
the hot swap when the registry moves an alias or adds a version.

A swap never fails a request: a new version is downloaded, loaded and warmed up while the old one keeps
serving; then the alias routes switch in one assignment; the old version finishes the requests it already took
(each request holds it through `ServedVersion.use()`) and only then is unloaded.

In a replica of several processes (kit.replica) every process follows the registry and loads the new version
itself; a loaded version waits as PREPARED until the other processes have it loaded too (`barrier`), and only then
serves. So the processes switch together (within one poll of each other) rather than each when its own load ends,
and a client whose connections reach different processes does not go back and forth between versions.
"""

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelgrid.client.errors import FailedPrecondition, InvalidArgument, ModelgridError, NotFound
from modelgrid.client.modelref import ModelRef, check_model_name
from modelgrid.client.registry import AsyncRegistryClient
from services.predictor.batching import BatchingConfig, BatchObserver, BatchQueue
from services.predictor.cache import ArtifactCache
from services.predictor.domain import VersionPolicy, VersionState
from services.predictor.runtime import ModelSignature

logger = logging.getLogger(__name__)

SAMPLES_KEPT = 4


class ServedVersion:
    """One version of a model on this replica: its runner behind a batch queue, and who is using it."""

    def __init__(self, model: str, version: int, digest: str) -> None:
        self.model = model
        self.version = version
        self.digest = digest
        self.state = VersionState.LOADING
        self.reason = ""
        self.signature: ModelSignature | None = None
        self.queue: BatchQueue | None = None
        self.available_since = 0.0
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def use(self) -> Iterator["ServedVersion"]:
        """Holds the version for one request; unloading waits until every holder let go."""
        self._users += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass
class ServedModel:
    """A model on this replica: its policy, versions, alias routes, and a few recent real inputs for warm-up."""

    name: str
    policy: VersionPolicy
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SAMPLES_KEPT))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def available(self) -> list[ServedVersion]:
        return sorted(
            (v for v in self.versions.values() if v.state == VersionState.AVAILABLE),
            key=lambda v: v.version,
            reverse=True,
        )


Loader = Callable[[Path], object]  # blocking: returns a runner with `.signature` and `__call__(inputs)`
Barrier = Callable[[str, list[int]], Awaitable[None]]
"""(model, versions): returns once the replica's other processes have those versions loaded (or cannot)."""


async def no_barrier(name: str, versions: list[int]) -> None:
    """A replica of one process waits for nobody."""


class ModelRepository:
    """Loads, routes, swaps and unloads model versions according to each model's policy and the registry."""

    def __init__(
        self,
        registry: AsyncRegistryClient,
        cache: ArtifactCache,
        loader: Loader,
        batching: BatchingConfig,
        *,
        warmup_requests: int = 2,
        observer_for: Callable[[str, int], BatchObserver | None] = lambda name, version: None,
        on_change: Callable[[], None] = lambda: None,
        barrier: Barrier = no_barrier,
    ) -> None:
        self._registry = registry
        self._barrier = barrier
        self._cache = cache
        self._loader = loader
        self._batching = batching
        self._warmup_requests = warmup_requests
        self._observer_for = observer_for
        self._on_change = on_change
        self.models: dict[str, ServedModel] = {}
        self._background: set[asyncio.Task] = set()

    # -- what callers use --------------------------------------------------------------------------------------

    def record_sample(self, name: str, inputs: dict[str, np.ndarray]) -> None:
        """Keeps a small real request to warm up future versions with."""
        model = self.models.get(name)
        if model is not None and all(a.ndim and a.shape[0] <= 8 for a in inputs.values()):
            model.samples.append(inputs)

    async def load(self, name: str, policy: VersionPolicy, wait: bool) -> ServedModel:
        """Serves `name` under `policy` (replacing an earlier policy)."""
        check_model_name(name)
        model = self.models.get(name)
        if model is None:
            model = self.models[name] = ServedModel(name, policy)
        else:
            model.policy = policy
            for version in list(model.versions.values()):
                if version.state == VersionState.FAILED:  # an explicit load retries failed versions
                    del model.versions[version.version]
        task = self.schedule(name)
        if wait:
            await asyncio.shield(task)  # a caller that stops waiting does not stop the load halfway
        return model

    async def unload(self, name: str) -> None:
        """Stops serving `name`; in-flight requests finish first."""
        model = self.models.pop(name, None)
        if model is None:
            raise NotFound(f"model {name!r} is not served by this replica")
        async with model.lock:
            model.routes = {}
            await asyncio.gather(*(self._retire(v) for v in list(model.versions.values())))
        self._on_change()

    def schedule(self, name: str) -> asyncio.Task:
        """Reconciles a model in the background (after a registry event, or for a load)."""
        task = asyncio.create_task(self.reconcile(name), name=f"reconcile-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for name in list(self.models):
            await self.unload(name)

    # -- reconciliation ----------------------------------------------------------------------------------------

    async def reconcile(self, name: str) -> None:
        """Makes the loaded versions and routes of `name` match its policy and the registry's current state."""
        model = self.models.get(name)
        if model is None:
            return
        async with model.lock:
            try:
                wanted, routes, reason = await self._desired(model)
            except ModelgridError as err:
                model.reason = f"cannot reconcile with the registry: {err}"
                logger.warning("cannot reconcile %s: %s", name, model.reason)
                model.settled.set()
                return
            if self.models.get(name) is not model:  # unloaded meanwhile
                return
            model.reason = reason
            new = [v for number, v in wanted.items() if number not in model.versions]
            for version in new:
                model.versions[version.version] = version
            await asyncio.gather(*(self._bring_up(model, v) for v in new))
            # Every loaded version not serving yet (this reconcile's, or one an interrupted reconcile left).
            prepared = [v for v in model.versions.values() if v.state == VersionState.PREPARED]
            if prepared:
                await self._wait_for_siblings(name, prepared)
                # The registry may have moved on while the processes loaded (an alias moved back): serve only what
                # it still wants; the rest is retired below.
                try:
                    wanted, routes, model.reason = await self._desired(model)
                except ModelgridError as err:
                    logger.warning("%s: keeping the versions resolved before loading (%s)", name, err)
            # From here to the route assignment nothing awaits: the new versions and routes serve together.
            for version in prepared:
                if version.version in wanted:
                    version.state = VersionState.AVAILABLE
                    version.available_since = time.time()
            # Route each alias to its new target once that is AVAILABLE; otherwise keep the old route serving.
            new_routes = {}
            for alias, number in routes.items():
                target = model.versions.get(number)
                if target is not None and target.state == VersionState.AVAILABLE:
                    new_routes[alias] = number
                elif alias in model.routes:
                    new_routes[alias] = model.routes[alias]
            model.routes = new_routes  # the swap: one assignment
            keep = set(wanted) | set(new_routes.values())
            for number, version in list(model.versions.items()):
                if number not in keep and version.state != VersionState.UNLOADING:
                    self._spawn(self._retire_from(model, version))
            model.settled.set()
        self._on_change()

    async def _wait_for_siblings(self, name: str, prepared: list[ServedVersion]) -> None:
        """The barrier (the replica's other processes load these versions too); a failure of the barrier itself
        only costs the switching together, never the versions."""
        try:
            await self._barrier(name, sorted(v.version for v in prepared))
        except Exception as exc:  # noqa: BLE001 - logged; serving the loaded versions is what matters
            logger.warning("%s: could not wait for the sibling processes (%s); serving anyway", name, exc)

    async def _desired(self, model: ServedModel) -> tuple[dict[int, ServedVersion], dict[str, int], str]:
        """The versions the policy wants (existing objects or new LOADING ones), the alias routes, and a reason
        when part of the policy cannot be met."""
        policy, name = model.policy, model.name
        found: dict[int, str] = {}  # version -> digest
        routes: dict[str, int] = {}
        problems: list[str] = []
        aliases = list(policy.aliases)
        if policy.all_aliases:
            try:
                aliases += sorted(set((await self._registry.get_model(name)).aliases) - set(aliases))
            except NotFound:
                pass
        refs = [(alias, ModelRef(name, alias=alias)) for alias in aliases]
        refs += [("", ModelRef(name, version=number)) for number in policy.versions]
        for alias, ref in refs:
            try:
                version = await self._registry.resolve(ref)
            except (NotFound, FailedPrecondition) as err:
                problems.append(str(err))  # e.g. the alias is not set: part of the policy waits
                continue
            found[version.version] = version.artifact.digest
            if alias:
                routes[alias] = version.version
        if policy.effective_latest:
            try:
                ready = await self._registry.list_versions(name)
            except NotFound as err:
                ready, problems = [], [str(err)]
            for version in ready[: policy.effective_latest]:
                found[version.version] = version.artifact.digest
            if not ready and not problems:
                problems.append(f"model {name!r} has no READY version")
        wanted = {n: model.versions.get(n) or ServedVersion(name, n, digest) for n, digest in found.items()}
        return wanted, routes, "; ".join(problems)

    async def _bring_up(self, model: ServedModel, version: ServedVersion) -> None:
        """Download, load, warm up: LOADING -> PREPARED, or FAILED with the reason."""
        started = time.monotonic()
        try:
            path = await self._cache.acquire(
                version.digest,
                lambda dest: self._registry.download_version(model.name, version.version, dest),
            )
            try:
                runner = await asyncio.to_thread(self._loader, path)
                version.signature = runner.signature
                config = self._batching
                if not runner.signature.batched:
                    config = dataclasses.replace(config, enabled=False)
                version.queue = BatchQueue(
                    runner,
                    config,
                    name=f"{model.name}:{version.version}",
                    observer=self._observer_for(model.name, version.version),
                )
                await version.queue.start()
                await self._warm_up(model, version)
            except BaseException:
                self._cache.release(version.digest)
                if version.queue is not None:
                    await version.queue.close(drain=False)
                raise
        except Exception as exc:  # noqa: BLE001 - any load failure is reported on the version; others keep serving
            version.state = VersionState.FAILED
            version.reason = _reason(exc)
            expected = isinstance(exc, ModelgridError)
            logger.warning(
                "%s:%d failed to load: %s",
                model.name,
                version.version,
                version.reason,
                exc_info=None if expected else exc,
            )
            return
        version.state = VersionState.PREPARED
        logger.info("%s:%d loaded in %.2fs", model.name, version.version, time.monotonic() - started)

    async def _warm_up(self, model: ServedModel, version: ServedVersion) -> None:
        """Runs recorded real requests (when their inputs fit the new signature) or synthetic ones."""
        signature = version.signature
        samples = []
        for sample in list(model.samples):
            try:
                signature.check_inputs(sample, max_rows=1 << 30)
                samples.append(sample)
            except InvalidArgument:
                continue
        if not samples:
            samples = [signature.synthetic_inputs(rows=1)]
        for i in range(self._warmup_requests):
            try:
                await version.queue.submit(samples[i % len(samples)])
            except ModelgridError as exc:
                raise FailedPrecondition(f"warm-up request failed: {exc}") from exc

    async def _retire_from(self, model: ServedModel, version: ServedVersion) -> None:
        await self._retire(version)
        if model.versions.get(version.version) is version:
            del model.versions[version.version]
        self._on_change()

    async def _retire(self, version: ServedVersion) -> None:
        """UNLOADING: waits for in-flight requests, then frees the version."""
        if version.state == VersionState.FAILED:
            return
        version.state = VersionState.UNLOADING
        await version.wait_idle()
        if version.queue is not None:
            await version.queue.close(drain=True)
            self._cache.release(version.digest)
        logger.info("%s:%d unloaded", version.model, version.version)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ModelgridError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
