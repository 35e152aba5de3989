"""Prometheus metrics of a gateway instance: per route requests, errors, latency, retries and ejections.

The method label takes only the methods the gateway knows (those of the proto descriptors this process imported:
main.py imports every routed API); any other path a caller makes up is counted under UNKNOWN_METHOD, so that
invented paths cannot grow the number of series without bound."""

from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from services.kit.metrics import UNKNOWN_METHOD, GaugeCollector, MethodLabels, described_method, snapshot

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MAX_CACHED = 4096
"""Labelled series, and method paths with their label, kept at hand for `observe` (more are still counted, only
looked up each time)."""

__all__ = ["UNKNOWN_METHOD", "GatewayMetrics", "described_method"]


class GatewayMetrics:
    def __init__(self, known_method: Callable[[str], bool] = described_method) -> None:
        """`known_method` says which method paths get a label of their own (default: the described ones)."""
        self.method_label = MethodLabels(known_method)
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
        # (service, label, code) -> the labelled counter and histogram: `labels()` costs more than the update.
        self._series: dict[tuple[str, str, grpc.StatusCode], tuple] = {}

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

    def watch(self, backends) -> None:
        """Adds the gauges of the upstream pools (gateway.upstreams.Backends), read when /metrics is scraped."""
        self.registry.register(GaugeCollector(lambda: upstream_gauges(backends)))

    def serve(self, port: int, host: str) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]


def upstream_gauges(backends) -> Iterator[tuple]:
    """Healthy instances and calls in flight per upstream service: one pass over the pools' members."""
    healthy, in_flight = [], []
    for service, pool in sorted(backends.all.items()):
        members = snapshot(lambda pool=pool: list(pool.members.values()))
        healthy.append(((service,), len(members)))
        in_flight.append(((service,), sum(member.in_flight for member in members)))
    yield ("modelgrid_gateway_upstream_instances", "Healthy instances per upstream service", ("service",), healthy)
    yield ("modelgrid_gateway_upstream_in_flight", "Calls in flight per upstream service", ("service",), in_flight)
