"""Dynamic server-side batching: concurrent requests for one model are merged into one execution and split back.

A `BatchQueue` takes requests (dicts of numpy arrays whose first dimension is the row count), groups the compatible
ones (same input names, dtypes and trailing shapes) into batches of at most `max_batch_size` rows, runs each batch
once with a blocking runner in an executor thread, and hands every caller its own rows of the outputs.

Rules, in the order a request meets them:

* `submit` refuses at once when `max_queue_depth` requests are already waiting (`ResourceExhausted`), when the
  queue is not running (`Unavailable`) or when the deadline has already passed (`DeadlineExceeded`).
* The collector takes the oldest waiting request, then adds compatible requests in FIFO order until the batch
  holds `max_batch_size` rows or the first request has waited `max_queue_delay_ms`. Requests that do not fit or
  are incompatible keep their place, so the oldest of them heads the next batch. A request larger than
  `max_batch_size` rows is neither split nor refused: it runs alone.
* One batch per queue executes at a time. While it runs, the next batch keeps collecting (pipelining) even past
  its delay, because it could not start earlier anyway.
* A request whose deadline passes or whose caller is cancelled before its batch starts is dropped and never runs.
  Once a batch has started, its requests are answered even past their deadlines.

Low load (`inline_when_idle`, with no queue delay): a request that finds its model idle runs at once on the
caller's path (the event loop thread), without the executor hop and the collector's round trip, which are most of
a single request's cost on a fast model. An inline run blocks the loop, so it hides other arriving requests; the
queue therefore watches for load with the requests that still take the batching path: every `INLINE_PROBE_EVERY`-th
request of an idle model goes through the executor, and a request that arrives while a batch executes switches the
queue to batching. It goes back to inline after `INLINE_AFTER_IDLE` requests in a row found it idle. Models whose
executions take longer than `inline_max_exec_ms` never run inline: the loop must stay free to take other calls.
"""

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelgrid.client.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

Runner = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]
"""Runs one batch; blocking (e.g. a TensorFlow concrete function). Called from an executor thread."""

_Signature = tuple[tuple[str, np.dtype, tuple[int, ...]], ...]


@dataclass(frozen=True)
class BatchingConfig:
    """How one model's requests are batched."""

    max_batch_size: int = 32
    """Rows per execution (the sum of the requests' first dimensions); a bigger single request runs alone."""
    max_queue_delay_ms: float = 2.0
    """How long the oldest waiting request may wait for others before its batch executes."""
    max_queue_depth: int = 1024
    """Requests waiting (not yet executing) beyond which `submit` raises ResourceExhausted at once."""
    enabled: bool = True
    """False: every request executes alone, still through the same queue and executor."""
    inline_when_idle: bool = False
    """With no queue delay: a request that finds the model idle (and not under load) runs at once on the caller's
    path instead of in the executor (see the module docstring)."""
    inline_max_exec_ms: float = 5.0
    """Inline runs only while the model's recent executions took at most this long (they block the event loop)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_depth < 1 or self.max_queue_delay_ms < 0:
            raise ValueError(f"invalid batching config {self}")
        if self.inline_max_exec_ms < 0:
            raise ValueError(f"invalid batching config {self}")

    @property
    def inline(self) -> bool:
        """Whether idle requests may run inline: asked for, and no delay to wait for others."""
        return self.inline_when_idle and self.max_queue_delay_ms == 0


INLINE_PROBE_EVERY = 8
"""While requests run inline, every this many-th takes the executor path, so that load can show itself."""
INLINE_AFTER_IDLE = 8
"""Requests in a row that found the model idle before the queue runs requests inline again."""
_EXEC_EWMA_WEIGHT = 0.2


class BatchObserver(Protocol):
    """Receives one call per executed batch (successful or not), e.g. to feed histograms and tracing spans."""

    def on_batch(self, rows: int, requests: int, queue_wait_s: list[float], exec_s: float) -> None:
        """rows and requests in the batch, each request's wait before execution, the execution's duration."""


@dataclass
class RequestTiming:
    """Filled in by the queue for one request (wall-clock nanoseconds, for trace spans)."""

    enqueued_ns: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    batch_requests: int = 0
    batch_rows: int = 0


class _Request:
    __slots__ = ("inputs", "rows", "signature", "deadline", "enqueued_at", "future", "dispatched", "timing")

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        signature: _Signature | None,
        deadline: float | None,
        timing: RequestTiming | None = None,
    ):
        self.inputs = inputs
        self.rows = rows
        self.signature = signature
        self.deadline = deadline
        self.timing = timing
        if timing is not None:
            timing.enqueued_ns = time.time_ns()
        self.enqueued_at = time.monotonic()
        self.future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self.dispatched = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline <= now


def _leading_rows(inputs: dict[str, np.ndarray]) -> int | None:
    """The first dimension shared by every input, or None if there is none."""
    firsts = {arr.shape[0] if arr.ndim else None for arr in inputs.values()}
    return firsts.pop() if len(firsts) == 1 else None


def _run_batch(runner: Runner, parts: list[dict[str, np.ndarray]], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Concatenates, runs and splits one batch; executes in the executor thread so numpy copies stay off the loop."""
    if len(parts) == 1:
        return [dict(runner(parts[0]))]
    merged = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    outputs = runner(merged)
    offsets = np.cumsum(rows)[:-1]
    split: list[dict[str, np.ndarray]] = [{} for _ in parts]
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != sum(rows):
            raise RuntimeError(
                f"output {name!r} has shape {arr.shape}, which cannot be split into {len(parts)} requests of "
                f"{sum(rows)} rows; disable batching for this model"
            )
        for target, piece in zip(split, np.split(arr, offsets), strict=True):
            target[name] = piece
    return split


class BatchQueue:
    """Batches one model's requests and executes them one batch at a time. Use `async with` or start()/close()."""

    def __init__(
        self,
        runner: Runner,
        config: BatchingConfig = BatchingConfig(),
        *,
        executor: concurrent.futures.Executor | None = None,
        name: str = "",
        observer: BatchObserver | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self._runner = runner
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._observer = observer
        self._queue: deque[_Request] = deque()
        self._forming: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._closing = False
        self._inline_mode = False  # see the module docstring: starts batching, goes inline once the model is idle
        self._idle_streak = 0
        self._inline_runs = 0
        self._exec_ewma_s = 0.0
        self.inline_executions = 0
        """Requests run inline so far (for tests and benches)."""

    @property
    def depth(self) -> int:
        """Requests waiting for execution: queued or in the batch being collected."""
        return len(self._queue) + sum(1 for r in self._forming if not r.future.done())

    async def start(self) -> None:
        """Starts the collector task; call from the event loop that will submit."""
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect_forever(), name=f"batch-queue-{self.name}")

    async def close(self, drain: bool = True) -> None:
        """Stops taking requests. drain=True executes the waiting ones first; drain=False fails them with
        Unavailable. Either way returns after the executing batch has finished and the collector has stopped."""
        self._closing = True
        if not drain:
            for request in [*self._queue, *self._forming]:
                if not request.future.done():
                    request.future.set_exception(Unavailable(f"model {self.name} is unloading"))
            self._queue.clear()
        self._wakeup.set()
        if self._collector is not None:
            await asyncio.shield(self._collector)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> "BatchQueue":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None, timing: RequestTiming | None = None
    ) -> dict[str, np.ndarray]:
        """Executes `inputs` in some batch and returns this request's rows of the outputs.

        deadline is an absolute time.monotonic() value. Raises InvalidArgument, ResourceExhausted,
        DeadlineExceeded, Unavailable, or whatever the runner raised for the batch."""
        if self._collector is None or self._closing:
            state = "unloading" if self._closing else "not started"
            raise Unavailable(f"model {self.name} is {state}")
        arrays = {key: np.asarray(value) for key, value in inputs.items()}
        rows = _leading_rows(arrays)
        signature: _Signature | None = None
        if self.config.enabled:
            if rows is None:
                raise InvalidArgument("batched inputs need at least one input, all with the same first dimension")
            signature = tuple(sorted((key, arr.dtype, arr.shape[1:]) for key, arr in arrays.items()))
        if self.depth >= self.config.max_queue_depth:
            raise ResourceExhausted(
                f"model {self.name} has {self.depth} requests waiting (max_queue_depth={self.config.max_queue_depth})"
            )
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before the request was queued")
        if self.config.inline and self._take_inline(rows):
            return self._run_inline(arrays, rows, timing)  # _take_inline admits only requests with rows
        request = _Request(arrays, rows if rows is not None else 1, signature, deadline, timing)
        self._queue.append(request)
        self._wakeup.set()
        timer = None
        if deadline is not None:  # one timer per request, no extra task
            timer = asyncio.get_running_loop().call_later(max(deadline - time.monotonic(), 0), self._expire, request)
        try:
            return await request.future
        except asyncio.CancelledError:
            self._withdraw(request, None)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _idle(self) -> bool:
        return not self._busy() and self.depth == 0

    def _take_inline(self, rows: int | None) -> bool:
        """Whether this request runs inline; also keeps the load watch (inline mode or batching mode) up to date."""
        idle = self._idle()
        if not idle:
            self._inline_mode, self._idle_streak = False, 0
            return False
        if not self._inline_mode:
            self._idle_streak += 1
            self._inline_mode = self._idle_streak >= INLINE_AFTER_IDLE
            return False
        if rows is None or rows > self.config.max_batch_size:
            return False
        if self._exec_ewma_s * 1000 > self.config.inline_max_exec_ms:
            return False
        self._inline_runs += 1
        return self._inline_runs % INLINE_PROBE_EVERY != 0  # the probe goes through the executor

    def _run_inline(self, inputs: dict[str, np.ndarray], rows: int, timing: RequestTiming | None) -> dict:
        """Executes one request now, on the event loop thread."""
        self.inline_executions += 1
        started, started_ns = time.monotonic(), time.time_ns()
        try:
            outputs = dict(self._runner(inputs))
        except Exception as exc:
            logger.warning("request for model %s failed: %r", self.name, exc)
            raise
        finally:
            self._executed(started, rows, 1, [0.0])
        if timing is not None:
            timing.enqueued_ns = timing.started_ns = started_ns
            timing.finished_ns, timing.batch_requests, timing.batch_rows = time.time_ns(), 1, rows
        return outputs

    def _executed(self, started: float, rows: int, requests: int, waits: list[float]) -> None:
        """Bookkeeping after an execution: the execution-time average and the observer."""
        exec_s = time.monotonic() - started
        self._exec_ewma_s += _EXEC_EWMA_WEIGHT * (exec_s - self._exec_ewma_s)
        if self._observer is not None:
            try:
                self._observer.on_batch(rows, requests, waits, exec_s)
            except Exception:
                logger.exception("batch observer for model %s failed", self.name)

    def _expire(self, request: _Request) -> None:
        """The request's deadline passed: drop it unless its batch already started."""
        if not request.future.done() and not request.dispatched:
            self._withdraw(request, DeadlineExceeded("the deadline passed while the request was queued"))

    def _withdraw(self, request: _Request, error: Exception | None) -> None:
        """Takes a request that has not started out of the queue; the collector drops it from a forming batch."""
        if request.dispatched:
            return
        if request in self._queue:
            self._queue.remove(request)
        if not request.future.done():
            if error is None:
                request.future.cancel()
            else:
                request.future.set_exception(error)

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:  # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancel that races its end
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    async def _collect_forever(self) -> None:
        try:
            while (first := await self._next_request()) is not None:
                self._forming = [first]
                await self._fill(first.enqueued_at + self.config.max_queue_delay_ms / 1000)
                batch = self._settle()
                if batch:
                    self._inflight = asyncio.create_task(self._execute(batch))
                    self._inflight.add_done_callback(lambda _: self._wakeup.set())
            if self._inflight is not None:
                await self._inflight
        except Exception:
            logger.exception("batch queue %s failed; failing its waiting requests", self.name)
            self._closing = True
            for request in [*self._queue, *self._forming]:
                if not request.future.done():
                    request.future.set_exception(Unavailable(f"model {self.name} batch queue failed"))
            self._queue.clear()

    async def _next_request(self) -> _Request | None:
        """The oldest live request, waiting for one; None once closing with nothing left."""
        while True:
            now = time.monotonic()
            while self._queue:
                request = self._queue.popleft()
                if request.expired(now) and not request.future.done():
                    request.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                if not request.future.done():
                    return request
            if self._closing:
                return None
            await self._wait(None)

    async def _fill(self, collect_until: float) -> None:
        """Adds requests to the forming batch until it is full or the delay is over, and the executor is free."""
        while True:
            self._forming = [r for r in self._forming if not r.future.done()]
            if not self._forming:
                return
            full = not self.config.enabled or self._top_up() >= self.config.max_batch_size
            remaining = collect_until - time.monotonic()
            if self._busy():
                await self._wait(None)  # woken by a new request or by the executing batch finishing
            elif full or remaining <= 0 or self._closing:
                return
            else:
                await self._wait(remaining)

    def _top_up(self) -> int:
        """Moves fitting compatible requests from the queue into the forming batch; returns its rows."""
        limit = self.config.max_batch_size
        rows = sum(r.rows for r in self._forming)
        if rows >= limit:
            return rows
        signature = self._forming[0].signature
        kept: deque[_Request] = deque()
        for request in self._queue:
            if request.signature == signature and rows + request.rows <= limit:
                self._forming.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._queue = kept
        return rows

    def _settle(self) -> list[_Request]:
        """Closes the forming batch: drops cancelled and expired requests, marks the rest as started."""
        now, batch = time.monotonic(), []
        for request in self._forming:
            if request.future.done():
                continue
            if request.expired(now):
                request.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                continue
            request.dispatched = True
            batch.append(request)
        self._forming = []
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        started_ns = time.time_ns()
        loop = asyncio.get_running_loop()
        try:
            parts, rows = [r.inputs for r in batch], [r.rows for r in batch]
            results = await loop.run_in_executor(self._executor, _run_batch, self._runner, parts, rows)
        except Exception as exc:
            logger.warning("batch of %d requests for model %s failed: %r", len(batch), self.name, exc)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
        else:
            finished_ns, rows_total = time.time_ns(), sum(r.rows for r in batch)
            for request, result in zip(batch, results, strict=True):
                if request.timing is not None:
                    timing = request.timing
                    timing.started_ns, timing.finished_ns = started_ns, finished_ns
                    timing.batch_requests, timing.batch_rows = len(batch), rows_total
                if not request.future.done():
                    request.future.set_result(result)
        self._executed(started, sum(r.rows for r in batch), len(batch), [started - r.enqueued_at for r in batch])
