"""Prometheus metrics of a predictor replica, served on their own HTTP port: requests by model version (code: the
gRPC status name, as in kit.metrics), batches, and gauges read at scrape time (queue depth, versions by state,
artifact cache bytes)."""

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from modelgrid.client import errors
from modelgrid.client.modelref import ModelRef
from services.kit.interceptors import STATUS_OF
from services.kit.metrics import GaugeCollector, snapshot
from services.predictor.domain import VersionState

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
        """Counts one answered request and its latency; the labelled children are looked up once per label set.
        `code` is "OK", a domain error's class name or "Cancelled"; the label is its gRPC status name."""
        key = (model, version, protocol, code)
        children = self._answered.get(key)
        if children is None:
            if len(self._answered) >= _MAX_CACHED_LABEL_SETS:
                self._answered.clear()
            labels = (model, str(version))
            status = grpc_status_name(code)
            children = (self.requests.labels(*labels, protocol, status), self.latency.labels(*labels))
            self._answered[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, control, cache) -> None:
        """Adds the gauges of a ModelControl and its ArtifactCache, read when /metrics is scraped."""
        self.registry.register(GaugeCollector(ServingGauges(control, cache).read))

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


_STATUS_NAMES = {"OK": "OK", "Cancelled": "CANCELLED", "DeadlineExceeded": "DEADLINE_EXCEEDED"}


def grpc_status_name(code: str) -> str:
    """The gRPC status name ("NOT_FOUND") of what Inference reports: "OK", "Cancelled" or the class name of a
    ModelgridError (any subclass, mapped as kit.interceptors maps it); a status name stays as it is."""
    known = _STATUS_NAMES.get(code)
    if known is not None:
        return known
    pending, seen = [errors.ModelgridError], set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.__name__ == code:
            return next((STATUS_OF[c].name for c in cls.__mro__ if c in STATUS_OF), "UNKNOWN")
        pending.extend(cls.__subclasses__())
    return code if code.isupper() else "UNKNOWN"


CACHE_SIZE_TTL_SECONDS = 30.0
"""How long the cache's measured size is reused between scrapes (measuring walks the cache's files)."""


class ServingGauges:
    """Queue depth per model version, versions by state and artifact cache bytes: bounded by the versions served
    (the cache's size is measured at most every CACHE_SIZE_TTL_SECONDS)."""

    def __init__(self, control, cache) -> None:
        self._control = control
        self._cache = cache
        self._cache_used = (0.0, -1)  # (measured at, bytes)
        self._lock = threading.Lock()

    def read(self) -> Iterator[tuple]:
        models = snapshot(self._control.index)
        by_state = {(m.name, state.value): 0 for m in models for state in VersionState}
        depth = []
        for model in models:
            for version in model.versions:
                by_state[(model.name, version.state.value)] += 1
                if version.state == VersionState.AVAILABLE:
                    queue = self._queue_of(model.name, version.version)
                    if queue is not None:
                        depth.append(((model.name, version.version), queue.depth))
        yield (
            "modelgrid_predictor_queue_depth",
            "Requests waiting for execution per model version (the batch queue)",
            ("model", "version"),
            depth,
        )
        yield (
            "modelgrid_predictor_versions",
            "Model versions on this replica by load state",
            ("model", "state"),
            list(by_state.items()),
        )
        yield (
            "modelgrid_predictor_cache_limit_bytes",
            "Artifact cache bound (MODELGRID_PREDICTOR_CACHE_MAX_BYTES)",
            (),
            [((), self._cache.max_bytes)],
        )
        yield ("modelgrid_predictor_cache_used_bytes", "Bytes in the artifact cache", (), [((), self._used())])

    def _queue_of(self, name: str, version: int):
        try:
            return self._control.select(ModelRef(name, version=version)).queue
        except Exception:  # noqa: BLE001 - unloaded between the index and now
            return None

    def _used(self) -> int:
        with self._lock:
            measured_at, used = self._cache_used
            now = time.monotonic()
            if used < 0 or now - measured_at > CACHE_SIZE_TTL_SECONDS:
                used = _tree_bytes(Path(self._cache.root))
                self._cache_used = (now, used)
            return used


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under root (entries that vanish while it walks are skipped)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total
