"""Worker agent entry point: `python -m services.trainer.agent` runs worker processes for the trainer until SIGTERM."""

import asyncio
import logging
import signal
import socket
from pathlib import Path

from modelgrid.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.kit.logs import configure_logging
from services.kit.server import GrpcService, ServiceSpec
from services.trainer.agent.servicer import WorkerAgentServicer
from services.trainer.agent.settings import AgentSettings
from services.trainer.agent.supervisor import ReplicaSupervisor

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
PROTO_SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["WorkerAgent"].full_name


async def _start(settings: AgentSettings) -> tuple[GrpcService, ReplicaSupervisor]:
    supervisor = ReplicaSupervisor(settings)
    spec = ServiceSpec(
        name=settings.service_name,
        version=VERSION,
        proto_services=[PROTO_SERVICE],
        add_servicers=lambda server: trainer_pb2_grpc.add_WorkerAgentServicer_to_server(
            WorkerAgentServicer(supervisor), server
        ),
        meta={"slots": str(settings.slots), "host": settings.advertise_host, "hostname": socket.gethostname()},
    )
    service = GrpcService(spec, settings)
    # Runs after server.stop (the standard order): no call can start a worker any more.
    service.add_cleanup(lambda: supervisor.close(settings.worker_stop_grace_seconds))
    await service.start()
    try:
        await supervisor.open(settings.work_dir or Path(f".run/agent-{service.port}"), service.instance_id)
    except BaseException:
        await service.stop()
        raise
    await service.set_serving(True)
    return service, supervisor


async def start_agent(settings: AgentSettings) -> GrpcService:
    """Builds and starts a worker agent; returns the running service (its bound port is `.port`). Stopping the
    service stops the agent's workers."""
    service, _ = await _start(settings)
    return service


async def serve(settings: AgentSettings) -> None:
    service, supervisor = await _start(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    supervisor.end_watches()  # WatchReplicas streams never end by themselves: end them so server.stop need not wait
    await service.stop()


def main() -> None:
    settings = AgentSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
