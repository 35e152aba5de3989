"""OpenTelemetry tracing: one TracerProvider per process and the gRPC interceptors that use it.

The standard OTEL_* variables work as in any OpenTelemetry SDK: OTEL_TRACES_EXPORTER (none, console, otlp),
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT and the exporter's other OTLP variables, OTEL_TRACES_SAMPLER and
OTEL_TRACES_SAMPLER_ARG (e.g. parentbased_traceidratio with 0.1), OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and
OTEL_SDK_DISABLED. A service's own settings (`MODELGRID_<SERVICE>_OTEL_EXPORTER`, `_OTEL_ENDPOINT`,
`_OTEL_SAMPLE_RATIO`) take precedence when set. One difference from the SDK: with neither set, nothing is exported
(the SDK's default would be OTLP to localhost, which every service would then retry forever).
"""

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased

from services.kit.settings import ServiceSettings

logger = logging.getLogger(__name__)

# Health checks run every few seconds from Consul; tracing them would drown the real traffic.
_NOT_HEALTH = filters.negate(filters.service_name("grpc.health.v1.Health"))
_enabled = False  # set by setup_tracing: whether this process exports spans
EXPORTERS = ("none", "console", "otlp")


def tracing_enabled() -> bool:
    """True when this process exports spans (its settings or OTEL_TRACES_EXPORTER name an exporter)."""
    return _enabled


@dataclass(frozen=True)
class TracingChoice:
    """What a process's tracing does, from its settings and the standard OTEL_* variables."""

    exporter: str
    """none, console or otlp."""
    endpoint: str | None
    """The OTLP endpoint a setting names; None: the exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT itself."""
    sampler: Sampler | None
    """A ratio sampler from the settings; None: the SDK's own choice from OTEL_TRACES_SAMPLER (default: every trace
    whose caller sampled it, and every new one)."""


def choose_tracing(settings: ServiceSettings, environ: Mapping[str, str] = os.environ) -> TracingChoice:
    """The settings first, then the standard variables; unknown exporter names fail at start."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return TracingChoice("none", None, ALWAYS_OFF)
    exporter = settings.otel_exporter or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "none"
    if exporter not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: modelgrid's services export to one of {EXPORTERS}")
    sampler = None
    if settings.otel_sample_ratio is not None:
        sampler = ParentBased(TraceIdRatioBased(settings.otel_sample_ratio))
    if exporter == "none":
        sampler = ALWAYS_OFF
    return TracingChoice(exporter, settings.otel_endpoint or None, sampler)


def service_resource(service_name: str, version: str) -> Resource:
    """service.name and service.version, unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name the service."""
    attributes = {"service.version": version}
    if str(Resource.create().attributes.get("service.name", "")).startswith("unknown_service"):
        attributes["service.name"] = service_name
    return Resource.create(attributes)


def setup_tracing(service_name: str, version: str, settings: ServiceSettings) -> TracerProvider:
    """Creates the process's TracerProvider with the exporter and sampler chosen (`choose_tracing`) and makes it
    global.

    Tracing is on or off per process: with no exporter, no interceptor is installed at all (each costs about
    0.1 ms per call), so set an exporter on every service whose hops a trace should cover."""
    global _enabled
    choice = choose_tracing(settings)
    _enabled = choice.exporter != "none"
    provider = TracerProvider(resource=service_resource(service_name, version), sampler=choice.sampler)
    exporter: SpanExporter | None = None
    if choice.exporter == "console":
        exporter = ConsoleSpanExporter()
    elif choice.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=choice.endpoint)  # TLS or not from the scheme or OTEL_EXPORTER_OTLP_*
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
        logger.info("tracing %s spans to %s (sampler %s)", service_name, choice.exporter, provider.sampler)
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
