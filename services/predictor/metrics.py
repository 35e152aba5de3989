"""Prometheus metrics of a predictor replica, served on their own HTTP port."""

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_MAX_CACHED_LABEL_SETS = 4096  # (model, version, protocol, code) children kept resolved; cleared when full


class PredictorMetrics:
    """Requests, errors, latency, queue wait, execution time and batch sizes by model and version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        self.requests = Counter(
            "modelgrid_predictor_requests",
            "Prediction requests answered",
            (*labels, "protocol", "code"),
            registry=self.registry,
        )
        self._answered: dict[tuple[str, int, str, str], tuple] = {}
        self.latency = Histogram(
            "modelgrid_predictor_request_seconds",
            "Time from request to answer inside the predictor",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "modelgrid_predictor_queue_wait_seconds",
            "Time a request waited for its batch to start",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.execution = Histogram(
            "modelgrid_predictor_execution_seconds",
            "Model execution time per batch",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "modelgrid_predictor_batch_size",
            "Requests per executed batch",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "modelgrid_predictor_batch_rows",
            "Rows per executed batch",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

    def answered(self, model: str, version: int, protocol: str, code: str, seconds: float) -> None:
        """Counts one answered request and its latency; the labelled children are looked up once per label set."""
        key = (model, version, protocol, code)
        children = self._answered.get(key)
        if children is None:
            if len(self._answered) >= _MAX_CACHED_LABEL_SETS:
                self._answered.clear()
            labels = (model, str(version))
            children = (self.requests.labels(*labels, protocol, code), self.latency.labels(*labels))
            self._answered[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observer(self, model: str, version: int) -> "BatchMetrics":
        """A BatchObserver feeding this model version's batch histograms."""
        return BatchMetrics(self, model, str(version))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics HTTP endpoint; returns its port (port 0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = server.server_address[1]
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


class BatchMetrics:
    """Per model version observer of executed batches."""

    def __init__(self, metrics: PredictorMetrics, model: str, version: str) -> None:
        self._queue_wait = metrics.queue_wait.labels(model, version)
        self._execution = metrics.execution.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._batch_rows = metrics.batch_rows.labels(model, version)

    def on_batch(self, rows: int, requests: int, queue_wait_s: list[float], exec_s: float) -> None:
        self._batch_size.observe(requests)
        self._batch_rows.observe(rows)
        self._execution.observe(exec_s)
        for wait in queue_wait_s:
            self._queue_wait.observe(wait)
