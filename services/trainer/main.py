"""Trainer entry point: `python -m services.trainer` runs the job service until SIGTERM (jobs keep running on
the agents; the next trainer re-attaches)."""

import asyncio
import logging
from pathlib import Path

import grpc

from modelgrid.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.kit.consul import ConsulClient
from services.kit.discovery import ChannelPool, ServiceResolver
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.kit.telemetry import client_interceptors
from services.registry.async_client import AsyncRegistryClient
from services.trainer.agents import AgentDirectory
from services.trainer.core import TrainerCore
from services.trainer.domain import Job
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore

logger = logging.getLogger(__name__)

SERVICE_NAME = "trainer"
VERSION = "0.1.0"
PROTO_SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name


def _registrar(registry: AsyncRegistryClient):
    """Pushes a finished job's SavedModel with its metrics, parameters and lineage, and sets its aliases."""

    async def register(job: Job, export_dir: Path, metrics: dict[str, float]) -> int:
        spec, name = job.spec, job.spec["register_model"]
        hp = spec.get("hyper_parameters", {})
        params = {k: str(v) for k, v in hp.items()}
        params.update(recipe=spec["recipe"], workers=str(job.workers), recipe_params=str(spec.get("recipe_params")))
        await registry.ensure_model(name)
        version = await registry.push_savedmodel(
            name,
            export_dir,
            request_id=f"trainer-job-{job.id}",  # a restarted trainer registering again gets the same version
            description=f"trained by job {job.id} ({spec.get('name') or spec['recipe']})",
            metrics=metrics,
            params=params,
            lineage={
                "training_job_id": job.id,
                "dataset_digest": job.dataset_digest,
                "source": f"modelgrid-trainer {VERSION}, recipe {spec['recipe']}",
            },
        )
        for alias in spec.get("register_aliases", []):
            await registry.set_alias(name, alias, version.version)
        return version.version

    return register


async def _discover(consul: ConsulClient, service: GrpcService, name: str) -> ServiceResolver:
    resolver = ServiceResolver(consul, name)
    await resolver.start()
    service.add_cleanup(resolver.stop)
    return resolver


async def start_trainer(settings: TrainerSettings) -> GrpcService:
    """Builds and starts the trainer; returns the running service (its bound port is `.port`)."""
    redis = create_redis(settings.redis_url)
    await redis.ping()
    holder: dict[str, TrainerCore] = {}
    spec = ServiceSpec(
        SERVICE_NAME, VERSION, [PROTO_SERVICE],
        lambda server: trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(holder["core"]), server),
    )  # fmt: skip
    service = GrpcService(spec, settings)
    service.add_cleanup(redis.aclose)
    consul = ConsulClient(settings.consul_url)
    service.add_cleanup(consul.close)
    options = grpc_options(settings)
    if settings.registry_target:
        channel = grpc.aio.insecure_channel(settings.registry_target, options=options,
                                            interceptors=client_interceptors())  # fmt: skip
        service.add_cleanup(channel.close)
        registry_channel = lambda: channel  # noqa: E731
    else:
        pool = ChannelPool(await _discover(consul, service, settings.registry_service), options=options,
                           interceptors=client_interceptors())  # fmt: skip
        service.add_cleanup(pool.close)
        registry_channel = pool.channel
    registry = AsyncRegistryClient(registry_channel, client_id="trainer")
    agents = AgentDirectory(await _discover(consul, service, settings.agent_service))
    service.add_cleanup(agents.close)
    settings.shared_dir.mkdir(parents=True, exist_ok=True)
    core = TrainerCore(JobStore(redis, settings.redis_key_prefix), agents, registry, settings, _registrar(registry))
    holder["core"] = core
    await service.start()
    service.add_cleanup(core.stop)
    await core.start()
    await service.set_serving(True)
    return service


async def serve(settings: TrainerSettings) -> None:
    service = await start_trainer(settings)
    await service.run_until_signal()


def main() -> None:
    settings = TrainerSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
