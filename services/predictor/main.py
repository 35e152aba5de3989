"""Predictor entry point: `python -m services.predictor` serves registry models until SIGTERM."""

import asyncio
import gc
import json
import logging
import os
from collections.abc import Iterable

import grpc

from modelgrid.client.registry import AsyncRegistryClient
from modelgrid.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.kit.channels import InstancePool
from services.kit.consul import ConsulClient
from services.kit.hostaddr import resolve_addresses
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis_from
from services.kit.replica import Supervisor, die_with_supervisor
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.kit.telemetry import setup_tracing
from services.predictor import converters as conv
from services.predictor.batch_jobs import BatchJobs
from services.predictor.batching import BatchingConfig
from services.predictor.cache import ArtifactCache
from services.predictor.control import ModelControl
from services.predictor.domain import VersionPolicy, VersionState
from services.predictor.follower import RegistryFollower
from services.predictor.inference import Inference
from services.predictor.metrics import PredictorMetrics
from services.predictor.protocols import add_protocol_servicers, protocol_service_names
from services.predictor.runtime import SavedModelRunner, configure_tensorflow
from services.predictor.servicer import PredictorServicer
from services.predictor.settings import PredictorSettings
from services.predictor.siblings import Siblings

logger = logging.getLogger(__name__)

SERVICE_NAME = "predictor"
VERSION = "0.1.0"
PROTO_SERVICE = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name


def _registry_pool(settings: PredictorSettings) -> tuple[InstancePool, ConsulClient | None]:
    """Channels to the registry: the fixed `registry_target`, or its healthy instances in Consul."""
    options = grpc_options(settings)
    tls = settings.internal_tls(SERVICE_NAME)
    if settings.registry_target:
        targets = [settings.registry_target]
        return InstancePool(None, settings.registry_service, targets=targets, options=options, tls=tls), None
    consul = ConsulClient(settings.consul_url, token=settings.consul_token)
    pool = InstancePool(
        consul, settings.registry_service, options=options, hold_seconds=settings.discovery_hold_seconds, tls=tls
    )
    return pool, consul


def registration_tags(models: Iterable[tuple[str, Iterable[int], Iterable[str]]]) -> list[str]:
    """The Consul tags the gateway routes by, from (model, available versions, aliases routed) triples."""
    tags = []
    for name, versions, aliases in models:
        versions = sorted(versions)
        if versions:
            tags.append(f"model={name}")
            tags += [f"version={name}:{v}" for v in versions]
            tags += [f"alias={name}@{alias}" for alias in sorted(aliases)]
    return tags


class _RegistrationUpdater:
    """Publishes which models and versions this replica serves: Consul tags (for the gateway's routing) and a
    grpc.health status per model ("model/<name>"). Coalesces bursts of changes into one update."""

    def __init__(self, service: GrpcService, control: ModelControl) -> None:
        self._service = service
        self._control = control
        self._pending: asyncio.Task | None = None

    def changed(self) -> None:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        await asyncio.sleep(0.05)
        models = self._control.index()
        for model in models:
            await self._service.set_health(f"model/{model.name}", bool(model.available))
        tags = registration_tags((m.name, [v.version for v in m.available], m.routes) for m in models)
        try:
            await self._service.update_registration(tags=tags)
        except Exception:  # noqa: BLE001 - the registration keeper retries; serving goes on
            logger.warning("could not update the Consul registration", exc_info=True)


# ---- a replica of several processes (kit.replica): what the supervisor asks its workers --------------------------


async def _worker_tags(channel: grpc.aio.Channel) -> frozenset[str]:
    """The tags a worker would publish, from its ListModels answer."""
    answer = await predictor_pb2_grpc.PredictorStub(channel).ListModels(predictor_pb2.ListModelsRequest(), timeout=5)
    available = predictor_pb2.VERSION_STATE_AVAILABLE
    models = []
    for model in answer.models:
        versions = [v for v in model.versions if v.state == available]
        models.append((model.name, [v.version for v in versions], [a for v in versions for a in v.aliases]))
    return frozenset(registration_tags(models))


async def _restart_env(channel: grpc.aio.Channel) -> dict[str, str]:
    """MODELS for a worker that starts again: every model a serving sibling serves, under the same policy (models
    loaded with LoadModel after start-up included), so that it binds the port only once it serves them too."""
    answer = await predictor_pb2_grpc.PredictorStub(channel).ListModels(predictor_pb2.ListModelsRequest(), timeout=5)
    models = []
    for model in answer.models:
        policy = conv.policy_from_pb(model.policy)
        config = {"name": model.name, "all_aliases": policy.all_aliases}
        if policy.versions:
            config["versions"] = list(policy.versions)
        elif policy.aliases:
            config["aliases"] = list(policy.aliases)
        else:
            config["latest"] = policy.effective_latest
        models.append(config)
    return {"MODELS": json.dumps(models)}


async def start_predictor(settings: PredictorSettings) -> GrpcService:
    """Builds and starts a predictor replica; SERVING once the configured models have had their first load.
    Returns the running service (its bound port is `.port`)."""
    configure_tensorflow(settings.tf_threads)
    await resolve_addresses(settings)  # "auto" host and advertise_host: this host's address
    tracer_provider = setup_tracing(SERVICE_NAME, VERSION, settings)  # before any channel: they take its interceptors
    redis = create_redis_from(settings, "predictor")
    await redis.ping()
    pool, consul = _registry_pool(settings)
    await pool.start()
    registry = AsyncRegistryClient(pool, client_id="predictor")
    metrics = PredictorMetrics()
    batching = BatchingConfig(
        settings.max_batch_size,
        settings.max_queue_delay_ms,
        settings.max_queue_depth,
        settings.batching_enabled,
        settings.inline_when_idle,
        settings.inline_max_exec_ms,
    )
    siblings = Siblings(settings.sibling_sockets)

    async def swap_barrier(name: str, versions: list[int]) -> None:
        await siblings.wait_loaded(name, versions, settings.swap_wait_seconds)

    cache = ArtifactCache(settings.cache_dir, settings.cache_max_bytes)
    control = ModelControl(
        registry,
        cache,
        SavedModelRunner,
        batching,
        warmup_requests=settings.warmup_requests,
        observer_for=metrics.observer,
        barrier=swap_barrier,
    )
    inference = Inference(control, metrics, settings.max_request_rows)
    jobs = BatchJobs(
        redis,
        registry,
        inference,
        control,
        default_batch_size=settings.batch_job_batch_size,
        max_records=settings.max_batch_job_records,
        max_input_bytes=settings.max_bulk_input_bytes,
    )
    native = PredictorServicer(
        inference, control, jobs, settings.max_streamed_job_bytes, settings.max_request_bytes, siblings
    )
    ready = asyncio.Event()

    def add_servicers(server: grpc.aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServicer_to_server(native, server)
        add_protocol_servicers(server, inference, control, ready.is_set, settings.max_request_bytes, siblings)

    spec = ServiceSpec(SERVICE_NAME, VERSION, [PROTO_SERVICE, *protocol_service_names()], add_servicers)
    metrics.watch(control, cache)
    service = GrpcService(spec, settings, tracer_provider, metrics=metrics.registry)
    service.add_cleanup(redis.aclose)
    if consul is not None:
        service.add_cleanup(consul.close)
    service.add_cleanup(pool.close)
    service.add_cleanup(siblings.close)
    # A worker of a multi-process replica binds the shared port only once it serves its models: the kernel hands
    # new connections to every listening worker, and one still loading would refuse their calls.
    if not settings.is_worker:
        await service.start()
    native.instance = service.instance_id
    jobs.instance = service.instance_id + (f"/{settings.worker_index}" if settings.is_worker else "")
    await jobs.fail_orphans()
    control.add_listener(_RegistrationUpdater(service, control).changed)
    service.add_cleanup(jobs.close)
    service.add_cleanup(control.close)
    service.serve_metrics()  # a worker serves its metrics while its models load (start() binds later)

    for model in settings.models:
        policy = VersionPolicy(model.latest, tuple(model.versions), tuple(model.aliases), model.all_aliases)
        await control.load(model.name, policy, wait=False)
    if settings.follow_registry:
        follower = RegistryFollower(
            registry,
            control,
            redis,
            f"mg:predictor:{jobs.instance}:cursor",
            auto_load=settings.auto_load,
            resync_seconds=settings.registry_resync_seconds,
        )
        await follower.start()
        service.add_cleanup(follower.stop)
    else:
        for model in settings.models:
            control.refresh(model.name)
    names = [model.name for model in settings.models]
    await control.wait_settled(names)
    for name in names:
        for version in control.status(name).versions:
            if version.state == VersionState.FAILED:
                logger.error("%s:%d did not load: %s", name, version.version, version.reason)
    # TensorFlow leaves a very large number of long-lived Python objects; moving them out of the collector's sight
    # keeps full collections (which walk every tracked object) from stalling the event loop.
    gc.collect()
    gc.freeze()
    ready.set()
    if settings.is_worker:
        await service.start()
    await service.set_serving(True)
    return service


async def serve(settings: PredictorSettings) -> None:
    if settings.is_worker:
        die_with_supervisor()
    elif settings.process_count() > 1:
        # TensorFlow's default is a thread pool per process as large as the machine: N processes would each run
        # that many threads on the same cores. Unless set, each process gets its share of the cores.
        cores = len(os.sched_getaffinity(0))
        threads = settings.tf_threads or max(1, cores // settings.process_count())
        supervisor = Supervisor(
            settings,
            module="services.predictor",
            env_prefix="MODELGRID_PREDICTOR_",
            name=SERVICE_NAME,
            version=VERSION,
            tags_of=_worker_tags,
            restart_env=_restart_env,
            worker_settings={"TF_THREADS": str(threads)},
        )
        await supervisor.start()
        await supervisor.run_until_signal()
        return
    service = await start_predictor(settings)
    await service.run_until_signal()


def main() -> None:
    settings = PredictorSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
