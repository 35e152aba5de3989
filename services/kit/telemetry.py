"""OpenTelemetry tracing: one TracerProvider per process and the gRPC interceptors that use it."""

import logging

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from services.kit.settings import ServiceSettings

logger = logging.getLogger(__name__)

# Health checks run every few seconds from Consul; tracing them would drown the real traffic.
_NOT_HEALTH = filters.negate(filters.service_name("grpc.health.v1.Health"))
_enabled = False  # set by setup_tracing: whether this process exports spans


def tracing_enabled() -> bool:
    """True when this process exports spans (its settings name an exporter)."""
    return _enabled


def setup_tracing(service_name: str, version: str, settings: ServiceSettings) -> TracerProvider:
    """Creates the process's TracerProvider with the exporter the settings choose and makes it global.

    Tracing is on or off per process: with no exporter, no interceptor is installed at all (each costs about
    0.1 ms per call), so set an exporter on every service whose hops a trace should cover."""
    global _enabled
    _enabled = settings.otel_exporter != "none"
    resource = Resource.create({"service.name": service_name, "service.version": version})
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON if _enabled else ALWAYS_OFF))
    exporter: SpanExporter | None = None
    if settings.otel_exporter == "console":
        exporter = ConsoleSpanExporter()
    elif settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint, insecure=True)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
        logger.info("tracing %s spans to %s", service_name, settings.otel_exporter)
    trace.set_tracer_provider(provider)
    return provider


def server_interceptors(provider: TracerProvider) -> list:
    """grpc.aio server interceptors that open a span per call, continuing the caller's W3C trace context (none
    when tracing is off)."""
    return [aio_server_interceptor(tracer_provider=provider, filter_=_NOT_HEALTH)] if _enabled else []


def client_interceptors(provider: TracerProvider | None = None) -> list:
    """grpc.aio client interceptors that open a span per call and send the W3C trace context along (none when
    tracing is off)."""
    if not _enabled:
        return []
    return aio_client_interceptors(tracer_provider=provider or trace.get_tracer_provider(), filter_=_NOT_HEALTH)
