"""Predictor entry point: `python -m services.predictor` serves registry models until SIGTERM."""

import asyncio
import gc
import logging
from dataclasses import dataclass

import grpc

from modelgrid.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.kit.consul import ConsulClient
from services.kit.discovery import ChannelPool, ServiceResolver
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.kit.telemetry import client_interceptors
from services.predictor.batch_jobs import BatchJobs
from services.predictor.batching import BatchingConfig
from services.predictor.cache import ArtifactCache
from services.predictor.follower import RegistryFollower
from services.predictor.inference import Inference
from services.predictor.metrics import PredictorMetrics
from services.predictor.protocols import add_protocol_servicers, protocol_service_names
from services.predictor.repository import ModelRepository, VersionPolicy, VersionState
from services.predictor.runtime import SavedModelRunner, configure_tensorflow
from services.predictor.servicer import PredictorServicer
from services.predictor.settings import PredictorSettings
from services.registry.async_client import AsyncRegistryClient

logger = logging.getLogger(__name__)

SERVICE_NAME = "predictor"
VERSION = "0.1.0"
PROTO_SERVICE = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name


@dataclass
class RunningPredictor:
    """A started predictor and the parts tests and main() need."""

    service: GrpcService
    repository: ModelRepository
    metrics_port: int


async def _registry_channels(settings: PredictorSettings, service: GrpcService):
    """A channel source for the registry: a fixed target, or healthy instances from Consul."""
    options = grpc_options(settings)
    if settings.registry_target:
        channel = grpc.aio.insecure_channel(settings.registry_target, options=options,
                                            interceptors=client_interceptors())  # fmt: skip
        service.add_cleanup(channel.close)
        return lambda: channel
    consul = ConsulClient(settings.consul_url)
    resolver = ServiceResolver(consul, settings.registry_service)
    await resolver.start()
    pool = ChannelPool(resolver, options=options, interceptors=client_interceptors())
    service.add_cleanup(consul.close)
    service.add_cleanup(resolver.stop)
    service.add_cleanup(pool.close)
    return pool.channel


class _RegistrationUpdater:
    """Publishes which models and versions this replica serves: Consul tags (for the gateway's routing) and a
    grpc.health status per model ("model/<name>"). Coalesces bursts of changes into one update."""

    def __init__(self, service: GrpcService, repository: ModelRepository) -> None:
        self._service = service
        self._repository = repository
        self._pending: asyncio.Task | None = None

    def changed(self) -> None:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        await asyncio.sleep(0.05)
        tags = []
        for name, model in sorted(self._repository.models.items()):
            available = model.available()
            await self._service.set_health(f"model/{name}", bool(available))
            if available:
                tags.append(f"model={name}")
                tags += [f"version={name}:{v.version}" for v in available]
                tags += [f"alias={name}@{alias}" for alias in sorted(model.routes)]
        try:
            await self._service.update_registration(tags=tags)
        except Exception:  # noqa: BLE001 - the next change retries; serving goes on
            logger.warning("could not update the Consul registration", exc_info=True)


async def start_predictor(settings: PredictorSettings) -> RunningPredictor:
    """Builds and starts a predictor replica; SERVING once the configured models have had their first load."""
    configure_tensorflow(settings.tf_threads)
    redis = create_redis(settings.redis_url)
    await redis.ping()
    metrics = PredictorMetrics()
    holder: dict[str, object] = {}

    def add_servicers(server: grpc.aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServicer_to_server(holder["native"], server)
        add_protocol_servicers(server, holder["inference"], holder["readiness"])

    spec = ServiceSpec(SERVICE_NAME, VERSION, [PROTO_SERVICE, *protocol_service_names()], add_servicers)
    service = GrpcService(spec, settings)
    service.add_cleanup(redis.aclose)
    registry = AsyncRegistryClient(await _registry_channels(settings, service), client_id="predictor")
    updater: _RegistrationUpdater | None = None
    batching = BatchingConfig(
        settings.max_batch_size, settings.max_queue_delay_ms, settings.max_queue_depth, settings.batching_enabled
    )
    repository = ModelRepository(
        registry,
        ArtifactCache(settings.cache_dir, settings.cache_max_bytes),
        SavedModelRunner,
        batching,
        warmup_requests=settings.warmup_requests,
        observer_for=metrics.observer,
        on_change=lambda: updater.changed() if updater else None,
    )
    inference = Inference(repository, metrics, settings.max_request_rows)
    jobs = BatchJobs(
        redis, registry, inference, instance="", default_batch_size=settings.batch_job_batch_size,
        max_records=settings.max_batch_job_records,
    )  # fmt: skip
    ready = asyncio.Event()
    holder.update(
        native=PredictorServicer(inference, jobs, registry, settings.max_streamed_job_bytes),
        inference=inference,
        readiness=ready.is_set,
    )
    await service.start()
    jobs.instance = holder["native"].instance = service.instance_id
    await jobs.fail_orphans()
    updater = _RegistrationUpdater(service, repository)
    service.add_cleanup(jobs.close)
    service.add_cleanup(repository.close)
    metrics_port = metrics.serve(settings.metrics_port, settings.host) if settings.metrics_port >= 0 else -1

    for model in settings.models:
        policy = VersionPolicy(model.latest, tuple(model.versions), tuple(model.aliases))
        await repository.load(model.name, policy, wait=False)
    if settings.follow_registry:
        follower = RegistryFollower(
            registry, repository, redis, f"mg:predictor:{service.instance_id}:cursor", auto_load=settings.auto_load
        )
        follower.start()
        service.add_cleanup(follower.stop)
    else:
        for model in settings.models:
            repository.schedule(model.name)
    await asyncio.gather(*(repository.models[m.name].settled.wait() for m in settings.models))
    for model in settings.models:
        failed = [v for v in repository.models[model.name].versions.values() if v.state == VersionState.FAILED]
        for version in failed:
            logger.error("%s:%d did not load: %s", model.name, version.version, version.reason)
    # TensorFlow leaves a very large number of long-lived Python objects; moving them out of the collector's sight
    # keeps full collections (which walk every tracked object) from stalling the event loop.
    gc.collect()
    gc.freeze()
    ready.set()
    await service.set_serving(True)
    return RunningPredictor(service, repository, metrics_port)


async def serve(settings: PredictorSettings) -> None:
    running = await start_predictor(settings)
    await running.service.run_until_signal()


def main() -> None:
    settings = PredictorSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
