"""Registry entry point: `python -m services.registry` builds the service from settings and serves until SIGTERM."""

import asyncio
import logging

from modelgrid.registry.v1 import registry_pb2, registry_pb2_grpc
from services.kit.hostaddr import resolve_addresses
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis_from
from services.kit.server import GrpcService, ServiceSpec
from services.kit.telemetry import setup_tracing
from services.kit.watch_limits import WatchLimits
from services.registry.blobstore import open_blob_store
from services.registry.core import ModelRegistry
from services.registry.metrics import registry_metrics
from services.registry.servicer import ModelRegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore

logger = logging.getLogger(__name__)

SERVICE_NAME = "registry"
VERSION = "0.1.0"
PROTO_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name


async def start_registry(settings: RegistrySettings) -> GrpcService:
    """Builds and starts the registry; returns the running service (its bound port is `.port`)."""
    await resolve_addresses(settings)  # "auto" host and advertise_host: this host's address
    tracer_provider = setup_tracing(SERVICE_NAME, VERSION, settings)
    redis = create_redis_from(settings, "registry")
    await redis.ping()
    store = RegistryStore(redis, settings.redis_key_prefix, settings.events_max_length)
    blobs = await asyncio.to_thread(open_blob_store, settings)  # local dir or S3 bucket, checked
    registry = ModelRegistry(store, blobs, settings)
    spec = ServiceSpec(
        name=SERVICE_NAME,
        version=VERSION,
        proto_services=[PROTO_SERVICE],
        add_servicers=lambda server: registry_pb2_grpc.add_ModelRegistryServicer_to_server(
            ModelRegistryServicer(registry, WatchLimits(settings.max_watch_streams, "MODELGRID_REGISTRY_")), server
        ),
    )
    service = GrpcService(spec, settings, tracer_provider, metrics=registry_metrics(blobs))
    service.add_cleanup(redis.aclose)
    await service.start()
    await service.set_serving(True)
    return service


async def serve(settings: RegistrySettings) -> None:
    service = await start_registry(settings)
    await service.run_until_signal()


def main() -> None:
    settings = RegistrySettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
