"""Prometheus metrics of a gateway instance: per route requests, errors, latency, retries and ejections.

The method label takes only the methods the gateway knows (those of the proto descriptors this process imported:
main.py imports every routed API); any other path a caller makes up is counted under UNKNOWN_METHOD, so that
invented paths cannot grow the number of series without bound."""

import re
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MAX_CACHED = 4096
"""Labelled series, and method paths with their label, kept at hand for `observe` (more are still counted, only
looked up each time)."""
UNKNOWN_METHOD = "unknown"
"""The method label of every call to a method no descriptor describes."""
_METHOD_PATH = re.compile(r"^/([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)/([A-Za-z_][A-Za-z0-9_]*)$")


def described_method(method: str) -> bool:
    """Whether a method path ("/pkg.Service/Method") is a method of a service in the default descriptor pool."""
    match = _METHOD_PATH.match(method)
    if match is None:
        return False
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(f"{match.group(1)}.{match.group(2)}")
    except KeyError:
        return False
    return descriptor.containing_service.full_name == match.group(1)


class GatewayMetrics:
    def __init__(self, known_method: Callable[[str], bool] = described_method) -> None:
        """`known_method` says which method paths get a label of their own (default: the described ones)."""
        self._known_method = known_method
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "modelgrid_gateway_requests", "Calls forwarded", ("service", "method", "code"), registry=registry
        )
        self.latency = Histogram(
            "modelgrid_gateway_request_seconds",
            "Call duration through the gateway",
            ("service",),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "modelgrid_gateway_retries", "Calls retried on another instance", ("service",), registry=registry
        )
        self.ejections = Counter(
            "modelgrid_gateway_ejections", "Instances ejected after a failure", ("service",), registry=registry
        )
        self.canary = Counter(
            "modelgrid_gateway_canary_redirects", "Calls sent to a canary alias", ("model",), registry=registry
        )
        self.rejected = Counter(
            "modelgrid_gateway_rejected", "Calls refused by auth or rate limits", ("reason",), registry=registry
        )
        # known method path -> its label; (service, label, code) -> the labelled counter and histogram: `labels()` costs
        # more than the update itself.
        self._labels: dict[str, str] = {}
        self._series: dict[tuple[str, str, grpc.StatusCode], tuple] = {}

    def method_label(self, method: str) -> str:
        """The method label of a call: its path when the method is known, else UNKNOWN_METHOD."""
        label = self._labels.get(method)
        if label is None:
            if not self._known_method(method):
                return UNKNOWN_METHOD  # not kept: invented paths do not crowd out the known ones
            label = method
            if len(self._labels) < _MAX_CACHED:
                self._labels[method] = label
        return label

    def observe(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Counts one forwarded call."""
        key = service, self.method_label(method), code
        series = self._series.get(key)
        if series is None:
            series = self.requests.labels(service, key[1], code.name), self.latency.labels(service)
            if len(self._series) < _MAX_CACHED:
                self._series[key] = series
        series[0].inc()
        series[1].observe(seconds)

    def serve(self, port: int, host: str) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
