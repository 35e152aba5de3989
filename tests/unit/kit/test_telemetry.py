"""Tracing choices from the settings and the standard OTEL_* variables, and trace ids on log lines."""

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from services.kit.logs import JsonFormatter, TraceContext
from services.kit.settings import ServiceSettings
from services.kit.telemetry import choose_tracing, service_resource


def settings(**values) -> ServiceSettings:
    return ServiceSettings(advertise_host="127.0.0.1", **values)


def test_nothing_is_exported_unless_a_setting_or_otel_traces_exporter_says_so():
    assert choose_tracing(settings(), {}).exporter == "none"
    assert choose_tracing(settings(), {}).sampler is ALWAYS_OFF
    chosen = choose_tracing(settings(), {"OTEL_TRACES_EXPORTER": "otlp"})
    assert (chosen.exporter, chosen.endpoint, chosen.sampler) == ("otlp", None, None)  # the SDK reads the rest
    assert choose_tracing(settings(otel_exporter="console"), {"OTEL_TRACES_EXPORTER": "otlp"}).exporter == "console"
    assert choose_tracing(settings(otel_exporter="none"), {"OTEL_TRACES_EXPORTER": "otlp"}).exporter == "none"


def test_otel_sdk_disabled_turns_tracing_off_whatever_the_settings_say():
    chosen = choose_tracing(settings(otel_exporter="otlp"), {"OTEL_SDK_DISABLED": "true"})
    assert chosen.exporter == "none" and chosen.sampler is ALWAYS_OFF


def test_an_endpoint_setting_wins_over_the_standard_variables_and_is_left_to_them_when_empty():
    chosen = choose_tracing(settings(otel_exporter="otlp", otel_endpoint="http://198.18.0.9:4317"), {})
    assert chosen.endpoint == "http://198.18.0.9:4317"
    assert choose_tracing(settings(otel_exporter="otlp"), {}).endpoint is None


def test_a_sample_ratio_setting_samples_that_share_of_new_traces_and_follows_callers():
    sampler = choose_tracing(settings(otel_exporter="otlp", otel_sample_ratio=0.25), {}).sampler
    assert isinstance(sampler, ParentBased)
    assert "0.25" in sampler.get_description()
    assert TraceIdRatioBased(0.25).get_description() in sampler.get_description()


def test_the_standard_sampler_variables_apply_when_no_ratio_is_set(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    chosen = choose_tracing(settings(), {"OTEL_TRACES_EXPORTER": "console"})
    provider = TracerProvider(sampler=chosen.sampler)
    assert "0.1" in provider.sampler.get_description()


def test_an_unknown_exporter_fails_at_start_naming_the_choices():
    with pytest.raises(ValueError, match="console"):
        choose_tracing(settings(), {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError):
        settings(otel_sample_ratio=1.5)


def test_otel_service_name_and_resource_attributes_name_the_service_when_set(monkeypatch):
    assert service_resource("registry", "1.2").attributes["service.name"] == "registry"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "registry-eu")
    resource = service_resource("registry", "1.2")
    assert resource.attributes["service.name"] == "registry-eu" and resource.attributes["service.version"] == "1.2"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=reg-b,deployment.environment=staging")
    resource = service_resource("registry", "1.2")
    assert resource.attributes["service.name"] == "reg-b"
    assert resource.attributes["deployment.environment"] == "staging"


def logged(formatter: logging.Formatter, tracer=None) -> str:
    """One line logged through a handler set up as configure_logging does, inside a span when `tracer` is given."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(TraceContext())
    log = logging.getLogger(f"test-telemetry-{id(stream)}")
    log.addHandler(handler)
    log.propagate = False
    if tracer is None:
        log.warning("outside")
    else:
        with tracer.start_as_current_span("call"):
            log.warning("inside")
    return stream.getvalue().strip()


def test_log_lines_carry_the_trace_and_span_ids_of_the_call_they_belong_to():
    tracer = TracerProvider().get_tracer("test")
    text = logging.Formatter("%(levelname)s %(message)s%(trace)s")
    assert logged(text) == "WARNING outside"
    line = logged(text, tracer)
    assert line.startswith("WARNING inside trace_id=")
    trace_id = line.split("trace_id=")[1].split()[0]
    assert len(trace_id) == 32 and int(trace_id, 16)
    entry = json.loads(logged(JsonFormatter(), tracer))
    assert len(entry["trace_id"]) == 32 and len(entry["span_id"]) == 16 and entry["msg"] == "inside"
    assert "trace_id" not in json.loads(logged(JsonFormatter()))
