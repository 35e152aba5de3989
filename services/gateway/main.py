"""Gateway entry point: `python -m services.gateway` serves the native gRPC front, the gRPC-Web front with the web
console, and /metrics, until SIGTERM."""

import asyncio
import logging

import grpc

# The descriptors of the routed APIs, so that the native front knows their unary methods (native.is_unary). Not
# imported by the modules tests load in-process: tritonclient's copy of the inference protos would clash.
import inference.grpc_service_pb2  # noqa: F401
import modelgrid.predictor.v1.predictor_pb2  # noqa: F401
import modelgrid.registry.v1.registry_pb2  # noqa: F401
import modelgrid.trainer.v1.trainer_pb2  # noqa: F401
from modelgrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.admin import GatewayAdminServicer
from services.gateway.auth import Authorizer
from services.gateway.canary import CanaryWeights
from services.gateway.metrics import GatewayMetrics
from services.gateway.native import ProxyHandler
from services.gateway.proxy import Forwarder
from services.gateway.settings import GatewaySettings
from services.gateway.upstreams import Backends
from services.kit.consul import ConsulClient
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.registry.async_client import AsyncRegistryClient

logger = logging.getLogger(__name__)

SERVICE_NAME = "gateway"
VERSION = "0.1.0"
PROTO_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name


class RunningGateway:
    """A started gateway: its service and the ports of its fronts."""

    def __init__(self, service: GrpcService, web_port: int, metrics_port: int) -> None:
        self.service = service
        self.web_port = web_port
        self.metrics_port = metrics_port


async def start_gateway(settings: GatewaySettings) -> RunningGateway:
    redis = create_redis(settings.redis_url)
    await redis.ping()
    consul = ConsulClient(settings.consul_url)
    metrics = GatewayMetrics()
    backends = Backends(consul, grpc_options(settings))
    registry_backend = await backends.get(settings.routes.get("modelgrid.registry.v1.", "registry"))
    registry = AsyncRegistryClient(lambda: registry_backend.pick().channel, client_id="gateway")
    canary = CanaryWeights(registry, settings.canary_weight_tag)
    forwarder = Forwarder(settings, backends, canary, metrics)
    authorizer = Authorizer(
        redis, enabled=settings.auth_enabled, admin_key=settings.admin_key,
        default_rate=settings.default_rate_limit, burst_seconds=settings.rate_burst_seconds,
        prefix=settings.redis_key_prefix,
    )  # fmt: skip

    def add_servicers(server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayAdminServicer_to_server(
            GatewayAdminServicer(authorizer, forwarder, backends, settings.routes), server
        )
        server.add_generic_rpc_handlers((ProxyHandler(forwarder, authorizer),))

    service = GrpcService(ServiceSpec(SERVICE_NAME, VERSION, [PROTO_SERVICE], add_servicers), settings)
    service.add_cleanup(redis.aclose)
    service.add_cleanup(consul.close)
    service.add_cleanup(backends.close)
    await service.start()
    canary.start()
    service.add_cleanup(canary.stop)
    web_port = -1
    if settings.web_port >= 0:
        from services.gateway.web import start_web_front

        web_port, stop_web = await start_web_front(settings, forwarder, authorizer)
        service.add_cleanup(stop_web)
    metrics_port = metrics.serve(settings.metrics_port, settings.host) if settings.metrics_port >= 0 else -1
    await service.set_serving(True)
    logger.info("gateway: gRPC on %d, gRPC-Web and console on %d", service.port, web_port)
    return RunningGateway(service, web_port, metrics_port)


async def serve(settings: GatewaySettings) -> None:
    running = await start_gateway(settings)
    await running.service.run_until_signal()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
