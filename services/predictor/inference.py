"""The transport-free prediction path every protocol shares: pick the served version, check the inputs against
its signature, queue them for the batcher, filter the outputs, and record metrics and spans."""

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from opentelemetry import trace

from modelgrid.client.errors import InvalidArgument, ModelgridError
from modelgrid.client.modelref import ModelRef
from services.kit.telemetry import tracing_enabled
from services.predictor.batching import RequestTiming
from services.predictor.control import ModelControl
from services.predictor.metrics import PredictorMetrics

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEADLINE_SLACK_S = 0.05
"""A call cancelled this close to its deadline is counted as DeadlineExceeded, not Cancelled."""


@dataclass
class Prediction:
    """Outputs of one request and the version that produced them."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]


class Inference:
    """Runs predictions for the protocol servicers on the versions ModelControl selects."""

    def __init__(self, control: ModelControl, metrics: PredictorMetrics, max_request_rows: int) -> None:
        self._control = control
        self._metrics = metrics
        self._max_rows = max_request_rows

    async def predict(
        self,
        ref: ModelRef,
        inputs: dict[str, np.ndarray],
        output_filter: Sequence[str] = (),
        *,
        deadline: float | None = None,
        protocol: str = "modelgrid",
    ) -> Prediction:
        """Predicts on the version `ref` selects. `deadline` is absolute, on the time.monotonic() clock."""
        started = time.monotonic()
        version = self._control.select(ref)
        code = "OK"
        span = None
        if tracing_enabled():  # with nothing exported a span is pure cost: not even a non-recording one
            span = tracer.start_span(
                "predictor.predict",
                attributes={"modelgrid.model": version.model, "modelgrid.version": version.version},
            )
        try:
            with trace.use_span(span, end_on_exit=True) if span is not None else nullcontext():
                with version.use():
                    version.signature.check_inputs(inputs, self._max_rows)
                    if output_filter:
                        known = {spec.name for spec in version.signature.outputs}
                        unknown = sorted(set(output_filter) - known)
                        if unknown:
                            raise InvalidArgument(f"unknown outputs {unknown}; the model has {sorted(known)}")
                    timing = RequestTiming() if span is not None and span.is_recording() else None
                    outputs = await version.queue.submit(inputs, deadline=deadline, timing=timing)
                    if timing is not None:
                        _record_spans(timing)
                self._control.record_sample(version.model, inputs)
        except ModelgridError as exc:
            code = type(exc).__name__
            if span is not None:
                span.set_attribute("modelgrid.error", code)
            raise
        except asyncio.CancelledError:  # the caller went away, or gRPC ended the call at its deadline
            # gRPC's timer and the deadline read from the call's time_remaining() differ by scheduling delay.
            expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
            code = "DeadlineExceeded" if expired else "Cancelled"
            raise
        finally:
            self._metrics.answered(version.model, version.version, protocol, code, time.monotonic() - started)
        if output_filter:
            outputs = {name: outputs[name] for name in output_filter}
        return Prediction(version.model, version.version, outputs)


def _record_spans(timing: RequestTiming) -> None:
    """Child spans of the current one for the time the request waited in the batch queue and the execution of
    the batch it ran in (shared with the other requests of that batch)."""
    tracer.start_span("predictor.queue_wait", start_time=timing.enqueued_ns).end(end_time=timing.started_ns)
    execute = tracer.start_span(
        "predictor.execute",
        start_time=timing.started_ns,
        attributes={"modelgrid.batch.requests": timing.batch_requests, "modelgrid.batch.rows": timing.batch_rows},
    )
    execute.end(end_time=timing.finished_ns)
