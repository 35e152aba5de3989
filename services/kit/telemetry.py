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


def setup_tracing(service_name: str, version: str, settings: ServiceSettings) -> TracerProvider:
    """Creates the process's TracerProvider with the exporter the settings choose and makes it global."""
    # Without an exporter, spans are only recorded under a caller that samples its trace: the context still
    # travels on (so a traced caller gets a whole trace), and untraced calls cost next to nothing.
    sampler = ParentBased(ALWAYS_ON if settings.otel_exporter != "none" else ALWAYS_OFF)
    resource = Resource.create({"service.name": service_name, "service.version": version})
    provider = TracerProvider(resource=resource, sampler=sampler)
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


def server_interceptor(provider: TracerProvider):
    """A grpc.aio server interceptor that opens a span per call, continuing the caller's W3C trace context."""
    return aio_server_interceptor(tracer_provider=provider, filter_=_NOT_HEALTH)


def client_interceptors(provider: TracerProvider | None = None) -> list:
    """grpc.aio client interceptors that open a span per call and send the W3C trace context along."""
    return aio_client_interceptors(tracer_provider=provider or trace.get_tracer_provider(), filter_=_NOT_HEALTH)
