"""Trainer entry point: `python -m services.trainer` runs the job service until SIGTERM (jobs keep running on
the agents; the next trainer re-attaches)."""

import asyncio
import logging

from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent import AgentClient
from services.kit.channels import InstancePool
from services.kit.consul import ConsulClient
from services.kit.hostaddr import resolve_addresses
from services.kit.leader import LeaderElection
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis_from
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.kit.telemetry import setup_tracing
from services.kit.watch_limits import WatchLimits
from services.trainer import VERSION
from services.trainer.core import TrainerCore
from services.trainer.metrics import trainer_metrics
from services.trainer.servicer import PROTO_SERVICE, TrainerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore

logger = logging.getLogger(__name__)

SERVICE_NAME = "trainer"
LEADER_TAG = "leader"
"""Consul tag of the leading trainer instance."""


async def start_trainer(settings: TrainerSettings) -> GrpcService:
    """Builds and starts the trainer; returns the running service (its bound port is `.port`)."""
    await resolve_addresses(settings)  # "auto" host and advertise_host: this host's address
    tracer_provider = setup_tracing(SERVICE_NAME, VERSION, settings)
    redis = create_redis_from(settings, "trainer")
    await redis.ping()
    consul = ConsulClient(settings.consul_url, token=settings.consul_token)
    targets = [settings.registry_target] if settings.registry_target else []
    hold = settings.discovery_hold_seconds
    registry_pool = InstancePool(
        consul,
        settings.registry_service,
        targets=targets,
        options=grpc_options(settings),
        hold_seconds=hold,
        tls=settings.internal_tls(SERVICE_NAME),
    )
    agent_pool = InstancePool(
        consul, settings.agent_service, hold_seconds=hold, tls=settings.internal_tls(SERVICE_NAME)
    )
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    registry = AsyncRegistryClient(registry_pool, client_id="trainer")
    core = TrainerCore(JobStore(redis, settings.redis_key_prefix), AgentClient(agent_pool), registry, settings)
    servicer = TrainerServicer(core, WatchLimits(settings.max_watch_streams, "MODELGRID_TRAINER_"))
    spec = ServiceSpec(SERVICE_NAME, VERSION, [PROTO_SERVICE], servicer.add_to)
    service = GrpcService(spec, settings, tracer_provider, metrics=trainer_metrics(core))
    service.add_cleanup(redis.aclose)
    service.add_cleanup(consul.close)
    service.add_cleanup(registry_pool.close)
    service.add_cleanup(agent_pool.close)
    try:
        await registry_pool.start()
        await agent_pool.start()
    except BaseException:
        await service.stop()
        raise
    await service.start()
    await service.set_serving(True)  # a standby serves too: it answers reads

    async def lead(epoch: int) -> None:
        await core.start(epoch)
        await _tag(service, [LEADER_TAG])

    async def step_down() -> None:
        await core.stop()
        await _tag(service, [])

    election = LeaderElection(
        consul,
        settings.leader_key,
        holder=service.instance_id,
        # The session ends with this host (serfHealth) or when this instance stops answering its health check.
        checks=["serfHealth", *([f"{service.instance_id}:grpc-health"] if settings.consul_enabled else [])],
        ttl_seconds=settings.leader_session_ttl_seconds,
        lock_delay_seconds=settings.leader_lock_delay_seconds,
        on_elected=lead,
        on_deposed=step_down,
    )
    core.on_fenced = election.resign
    core.leader_elsewhere = lambda: election.held_elsewhere
    election.start()
    service.add_cleanup(election.stop)  # runs first: the lead is handed over before the channels close
    try:  # ready when there is a leader, this one or another (a first trainer waits for Consul's first check)
        async with asyncio.timeout(settings.leader_session_ttl_seconds):
            await election.settled.wait()
    except TimeoutError:
        logger.warning("no trainer leads yet after %.0fs; serving reads meanwhile", settings.leader_session_ttl_seconds)
    return service


async def _tag(service: GrpcService, tags: list[str]) -> None:
    """Publishes in Consul whether this instance leads (the gateway sends Trainer calls to the one tagged)."""
    try:
        await service.update_registration(tags=tags)
    except Exception:  # noqa: BLE001 - the registration keeper publishes it when Consul is back
        logger.warning("could not update the Consul registration", exc_info=True)


async def serve(settings: TrainerSettings) -> None:
    service = await start_trainer(settings)
    await service.run_until_signal()


def main() -> None:
    settings = TrainerSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
