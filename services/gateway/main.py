"""Gateway entry point: `python -m services.gateway` serves the native gRPC front, the gRPC-Web front with the web
console, and /metrics, until SIGTERM."""

import asyncio
import logging

import grpc

# The descriptors of the routed APIs, so that both fronts know their unary methods (proxy.is_unary). Not
# imported by the modules tests load in-process: tritonclient's copy of the inference protos would clash.
import modelgrid.oip.grpc_service_pb2  # noqa: F401
import modelgrid.predictor.v1.predictor_pb2  # noqa: F401
import modelgrid.registry.v1.registry_pb2  # noqa: F401
import modelgrid.trainer.v1.trainer_pb2  # noqa: F401
from modelgrid.client.registry import AsyncRegistryClient
from modelgrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.admin import GatewayAdminServicer, LocalAdminCalls
from services.gateway.auth import Authorizer, admin_key_from_file
from services.gateway.canary import CanaryWeights
from services.gateway.metrics import GatewayMetrics
from services.gateway.native import ProxyHandler
from services.gateway.proxy import Forwarder
from services.gateway.settings import GatewaySettings
from services.gateway.upstreams import Backends
from services.kit.consul import ConsulClient
from services.kit.hostaddr import resolve_addresses
from services.kit.logs import configure_logging
from services.kit.redis_client import create_redis_from
from services.kit.replica import Supervisor, die_with_supervisor
from services.kit.server import GrpcService, ServiceSpec, grpc_options
from services.kit.telemetry import setup_tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = "gateway"
ENV_PREFIX = "MODELGRID_GATEWAY_"
VERSION = "0.1.0"
PROTO_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name


async def start_gateway(settings: GatewaySettings) -> GrpcService:
    """Builds and starts a gateway: the native gRPC front, the gRPC-Web front (unless web_port is -1) and /metrics
    (unless metrics_port is -1). Returns the running service (its bound port is `.port`)."""
    await resolve_addresses(settings)  # "auto" host and advertise_host: this host's address
    tracer_provider = setup_tracing(SERVICE_NAME, VERSION, settings)  # before any channel: they take its interceptors
    redis = create_redis_from(settings, "gateway")
    await redis.ping()
    consul = ConsulClient(settings.consul_url, token=settings.consul_token)
    metrics = GatewayMetrics()
    backends = Backends(
        consul,
        grpc_options(settings),
        hold_seconds=settings.discovery_hold_seconds,
        tls=settings.internal_tls(SERVICE_NAME),
    )
    registry_pool = await backends.get(settings.routes.get("modelgrid.registry.v1.", "registry"))
    canary = CanaryWeights(
        AsyncRegistryClient(registry_pool, client_id="gateway"),
        settings.canary_weight_tag,
        resync_seconds=settings.registry_resync_seconds,
    )
    forwarder = Forwarder(settings, backends, canary, metrics)
    authorizer = Authorizer(
        redis,
        enabled=settings.auth_enabled,
        admin_key=settings.admin_key or (admin_key_from_file(settings.admin_key_file) if settings.auth_enabled else ""),
        default_rate=settings.default_rate_limit,
        burst_seconds=settings.rate_burst_seconds,
        prefix=settings.redis_key_prefix,
        max_streams=settings.max_streams_per_caller,
        key_cache_seconds=settings.api_key_cache_seconds,
        key_cache_size=settings.api_key_cache_size,
        rate_lease_tokens=settings.rate_lease_tokens,
        rate_lease_seconds=settings.rate_lease_seconds,
    )
    admin = GatewayAdminServicer(authorizer, backends, settings.routes)
    proxy = ProxyHandler(forwarder, authorizer)

    def add_servicers(server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayAdminServicer_to_server(admin, server)
        server.add_generic_rpc_handlers((proxy,))

    spec = ServiceSpec(SERVICE_NAME, VERSION, [PROTO_SERVICE], add_servicers, public=True)
    metrics.watch(backends)
    service = GrpcService(spec, settings, tracer_provider, metrics=metrics.registry)
    service.add_cleanup(redis.aclose)
    service.add_cleanup(consul.close)
    service.add_cleanup(backends.close)
    await service.start()
    canary.start()
    service.add_cleanup(canary.stop)
    web_port = -1
    if settings.web_port >= 0:
        from services.gateway.web import start_web_front

        web_port, stop_web = await start_web_front(settings, forwarder, authorizer, LocalAdminCalls(admin))
        service.add_cleanup(stop_web)
    await service.set_serving(True)
    logger.info("gateway: gRPC on %d, gRPC-Web and console on %d", service.port, web_port)
    return service


async def serve(settings: GatewaySettings) -> None:
    if settings.is_worker:
        die_with_supervisor()
    elif settings.process_count() > 1:
        if settings.auth_enabled and not settings.admin_key:
            admin_key_from_file(settings.admin_key_file)  # made once, before the workers read it
        supervisor = Supervisor(
            settings, module="services.gateway", env_prefix=ENV_PREFIX, name=SERVICE_NAME, version=VERSION, public=True
        )
        if settings.web_port >= 0:
            supervisor.share_port("WEB_PORT", settings.web_port)
        await supervisor.start()
        await supervisor.run_until_signal()
        return
    service = await start_gateway(settings)
    await service.run_until_signal()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
