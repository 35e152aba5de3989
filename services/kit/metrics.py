"""Prometheus metrics every service shares: the RPC metrics with one label scheme, recorded by the error mapping
interceptor (kit.interceptors), scrape-time gauges, and the /metrics HTTP endpoint.

Series: `modelgrid_rpc_server_handled_total{service, method, code}` (code: the gRPC status name),
`modelgrid_rpc_server_handling_seconds{service, method}` and `modelgrid_rpc_server_in_flight{service}`. The
method label is the method path when a proto descriptor this process imported describes it, else UNKNOWN_METHOD,
so that invented paths cannot grow the number of series; health checks are not counted."""

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

RPC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
UNKNOWN_METHOD = "unknown"
"""The method label of every call to a method no descriptor describes."""
UNCOUNTED_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods left out of the RPC metrics: Consul's and the supervisors' health checks."""
_METHOD_PATH = re.compile(r"^/([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)/([A-Za-z_][A-Za-z0-9_]*)$")
_MAX_METHODS = 4096  # method labels kept resolved; more are still counted, only looked up each time


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


class MethodLabels:
    """The method label of a call: its path when `known(path)` (by default: a proto descriptor describes it), else
    UNKNOWN_METHOD. Known paths are kept resolved, up to _MAX_METHODS; invented ones are never kept, so that they
    cannot crowd out the real ones."""

    def __init__(self, known: Callable[[str], bool] = described_method) -> None:
        self._known = known
        self._labels: dict[str, str] = {}

    def __call__(self, method: str) -> str:
        label = self._labels.get(method)
        if label is None:
            if not self._known(method):
                return UNKNOWN_METHOD
            label = method
            if len(self._labels) < _MAX_METHODS:
                self._labels[method] = label
        return label


class RpcMetrics:
    """The RPC metrics of one service, in its CollectorRegistry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        service: str,
        known_method: Callable[[str], bool] = described_method,
    ) -> None:
        self.service = service
        self.method_label = MethodLabels(known_method)
        self.handled = Counter(
            "modelgrid_rpc_server_handled",
            "RPCs completed by the server, by method and gRPC status",
            ("service", "method", "code"),
            registry=registry,
        )
        self.handling = Histogram(
            "modelgrid_rpc_server_handling_seconds",
            "Time from the start of an RPC to its end on the server",
            ("service", "method"),
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        in_flight = Gauge(
            "modelgrid_rpc_server_in_flight", "RPCs in progress on the server", ("service",), registry=registry
        )
        self.in_flight = in_flight.labels(service)

    def recorder(self, method: str) -> "MethodRecorder | None":
        """What records the calls of one method (None for the methods left out: health checks)."""
        if method.startswith(UNCOUNTED_PREFIXES):
            return None
        return MethodRecorder(self, self.method_label(method))

    def unimplemented(self, method: str) -> None:
        """Counts a call to a method this server has no handler for (gRPC answers UNIMPLEMENTED)."""
        if not method.startswith(UNCOUNTED_PREFIXES):
            self.handled.labels(self.service, self.method_label(method), "UNIMPLEMENTED").inc()


class MethodRecorder:
    """The labelled series of one method, resolved once (a `labels()` lookup costs more than the update); the
    handled counter's children are cached per code as they appear."""

    __slots__ = ("_metrics", "_method", "_by_code", "_handling", "in_flight")

    def __init__(self, metrics: RpcMetrics, method: str) -> None:
        self._metrics = metrics
        self._method = method
        self._by_code: dict[grpc.StatusCode | int | None, object] = {}
        self._handling = metrics.handling.labels(metrics.service, method)
        self.in_flight = metrics.in_flight

    def done(self, code: grpc.StatusCode | int | None, started: float) -> None:
        """Records one finished call that started at `started` (time.perf_counter()). `code` as a servicer context
        holds it: a grpc.StatusCode, its integer value (grpc.aio's context) or None (OK)."""
        self._handling.observe(time.perf_counter() - started)
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._metrics.handled.labels(self._metrics.service, self._method, status_name(code))
            self._by_code[code] = counter
        counter.inc()


_NAME_OF_VALUE = {status.value[0]: status.name for status in grpc.StatusCode}


def status_name(code: grpc.StatusCode | int | None) -> str:
    """The gRPC status name ("OK", "NOT_FOUND") of a code, its integer value, or None (OK)."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _NAME_OF_VALUE.get(code, "UNKNOWN")


class GaugeCollector(Collector):
    """Gauges read at scrape time: `read()` yields (name, help, label names, [(label values, value)]) and runs
    in the scrape's thread, so it must only read (and bound its work); a read that fails leaves those gauges out
    of that scrape."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, tuple[str, ...], list]]]) -> None:
        self._read = read

    def describe(self) -> list:
        return []  # no description at registration: collect() is not called then

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            families = list(self._read())
        except Exception:  # noqa: BLE001 - a scrape must not fail for one reader
            logger.warning("a metrics reader failed", exc_info=True)
            return
        for name, doc, labels, samples in families:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for values, value in samples:
                family.add_metric([str(v) for v in values], float(value))
            yield family


def snapshot(read: Callable[[], list], attempts: int = 3) -> list:
    """`read()` retried when the event loop changed a dict while the scrape's thread iterated over it."""
    for attempt in range(attempts):
        try:
            return read()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    return []


class MetricsEndpoint:
    """The /metrics HTTP endpoint of a registry (prometheus_client's server in a daemon thread)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.port = -1
        self._server = None

    def start(self, port: int, host: str) -> int:
        """Serves /metrics on host:port (0: a free port); returns the bound port. Starts once."""
        if self._server is None:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = self._server.server_address[1]
            logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
