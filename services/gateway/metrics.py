"""Prometheus metrics of a gateway instance: per route requests, errors, latency, retries and ejections."""

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MAX_CACHED = 4096
"""Labelled series kept at hand for `observe` (more are still counted, only looked up each time)."""


class GatewayMetrics:
    def __init__(self) -> None:
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
        # (method, code) -> the labelled counter and histogram: `labels()` costs more than the update itself.
        self._series: dict[tuple[str, grpc.StatusCode], tuple] = {}

    def observe(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Counts one forwarded call (a method always goes to the same service)."""
        series = self._series.get((method, code))
        if series is None:
            series = self.requests.labels(service, method, code.name), self.latency.labels(service)
            if len(self._series) < _MAX_CACHED:
                self._series[method, code] = series
        series[0].inc()
        series[1].observe(seconds)

    def serve(self, port: int, host: str) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
