"""Prometheus metrics of a gateway instance: per route requests, errors, latency, retries and ejections."""

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("modelgrid_gateway_requests", "Calls forwarded", ("service", "method", "code"),
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("modelgrid_gateway_request_seconds", "Call duration through the gateway",
                                 ("service",), buckets=_BUCKETS, registry=self.registry)  # fmt: skip
        self.retries = Counter("modelgrid_gateway_retries", "Calls retried on another instance", ("service",),
                               registry=self.registry)  # fmt: skip
        self.ejections = Counter("modelgrid_gateway_ejections", "Instances ejected after a failure", ("service",),
                                 registry=self.registry)  # fmt: skip
        self.canary = Counter("modelgrid_gateway_canary_redirects", "Calls sent to a canary alias", ("model",),
                              registry=self.registry)  # fmt: skip
        self.rejected = Counter("modelgrid_gateway_rejected", "Calls refused by auth or rate limits", ("reason",),
                                registry=self.registry)  # fmt: skip

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(service, method, code).inc()
        self.latency.labels(service).observe(seconds)

    def serve(self, port: int, host: str) -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
