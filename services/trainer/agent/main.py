"""Worker agent entry point: `python -m services.trainer.agent` runs worker processes for the trainer until SIGTERM."""

import asyncio
import logging
import socket
from pathlib import Path

from modelgrid.client.registry import AsyncRegistryClient
from services.kit.channels import InstancePool
from services.kit.consul import ConsulClient
from services.kit.hostaddr import resolve_addresses
from services.kit.logs import configure_logging
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.kit.telemetry import setup_tracing
from services.trainer import VERSION
from services.trainer.agent.metrics import agent_metrics
from services.trainer.agent.servicer import PROTO_SERVICE, WorkerAgentServicer
from services.trainer.agent.settings import AgentSettings
from services.trainer.agent.supervisor import ReplicaSupervisor

logger = logging.getLogger(__name__)


async def start_agent(settings: AgentSettings) -> GrpcService:
    """Builds and starts a worker agent; returns the running service (its bound port is `.port`). Stopping the
    service stops the agent's workers."""
    await resolve_addresses(settings)  # "auto" host and advertise_host: this host's address
    tracer_provider = setup_tracing(settings.service_name, VERSION, settings)
    # Data sets, checkpoints and exports move through the registry: the agent reads no other host's files.
    consul = ConsulClient(settings.consul_url, token=settings.consul_token)
    registry_pool = InstancePool(
        consul,
        settings.registry_service,
        targets=[settings.registry_target] if settings.registry_target else [],
        options=grpc_options(settings),
        hold_seconds=settings.discovery_hold_seconds,
        tls=settings.internal_tls(settings.service_name),
    )
    registry = AsyncRegistryClient(registry_pool, client_id=f"{settings.service_name}@{socket.gethostname()}")
    supervisor = ReplicaSupervisor(settings, registry)
    servicer = WorkerAgentServicer(supervisor)
    spec = ServiceSpec(
        name=settings.service_name,
        version=VERSION,
        proto_services=[PROTO_SERVICE],
        add_servicers=servicer.add_to,
        callers=frozenset(settings.allowed_callers),  # with internal TLS: the trainer, no one else
        meta={"slots": str(settings.slots), "host": settings.advertise_host, "hostname": socket.gethostname()},
    )
    service = GrpcService(spec, settings, tracer_provider, metrics=agent_metrics(supervisor, settings.slots))
    # WatchReplicas streams never end by themselves: they end when shutdown begins, so the server need not wait.
    service.on_stopping(supervisor.end_watches)
    service.add_cleanup(consul.close)
    service.add_cleanup(registry_pool.close)
    # Runs after server.stop (the standard order): no call can start a worker any more.
    service.add_cleanup(lambda: supervisor.close(settings.worker_stop_grace_seconds))
    try:
        await registry_pool.start()
    except BaseException:
        await service.stop()
        raise
    await service.start()
    try:
        await supervisor.open(settings.work_dir or Path(f".run/agent-{service.port}"), service.instance_id)
    except BaseException:
        await service.stop()
        raise
    await service.set_serving(True)
    return service


async def serve(settings: AgentSettings) -> None:
    service = await start_agent(settings)
    await service.run_until_signal()


def main() -> None:
    settings = AgentSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
