"""The dynamic batcher on its own: merging, splitting, limits, deadlines, cancellation, errors and shutdown."""

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from modelgrid.client.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.predictor.batching import (
    INLINE_AFTER_IDLE,
    INLINE_PROBE_EVERY,
    BatchingConfig,
    BatchQueue,
    RequestTiming,
)

LONG_DELAY_MS = 5_000.0  # a window no test waits out: batches in those tests execute because they are full


class RecordingRunner:
    """Doubles "x" into "y", records every call's inputs, and can hold its first call until released."""

    def __init__(self, *, hold_first: bool = False, fn: Callable[[dict], dict] | None = None) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.threads: set[int] = set()
        self.started = threading.Event()
        self.release = threading.Event()
        self._hold_first = hold_first
        self._fn = fn or (lambda d: {"y": d["x"] * 2})

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append({name: arr.copy() for name, arr in inputs.items()})
        self.threads.add(threading.get_ident())
        if self._hold_first and len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(5), "test never released the runner"
        return self._fn(inputs)

    @property
    def rows(self) -> list[int]:
        return [len(call["x"]) for call in self.calls]

    def seen(self) -> set[float]:
        """Every "x" value the runner received (tests give each request distinct values)."""
        return {float(v) for call in self.calls for v in call["x"].ravel()}

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 5), "runner never started"


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int, list[float], float]] = []

    def on_batch(self, rows: int, requests: int, queue_wait_s: list[float], exec_s: float) -> None:
        self.batches.append((rows, requests, queue_wait_s, exec_s))


def rows_of(value: float, n: int = 1, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, dtype=np.float32)}


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


def config(**overrides) -> BatchingConfig:
    return BatchingConfig(**{"max_batch_size": 8, "max_queue_delay_ms": LONG_DELAY_MS, **overrides})


async def test_concurrent_requests_share_one_execution_and_get_their_own_rows():
    runner, observer = RecordingRunner(), RecordingObserver()
    async with BatchQueue(runner, config(), name="m", observer=observer) as queue:
        results = await asyncio.gather(*(queue.submit(rows_of(i)) for i in range(8)))
    assert runner.rows == [8]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((1, 3), 2 * i, dtype=np.float32))
    assert threading.get_ident() not in runner.threads
    [(rows, requests, waits, exec_s)] = observer.batches
    assert (rows, requests, len(waits)) == (8, 8, 8)
    assert all(w >= 0 for w in waits) and exec_s >= 0


async def test_requests_of_different_sizes_are_split_back_by_row_count():
    def fn(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": d["x"] * 2, "total": d["x"].sum(axis=1, keepdims=True)}

    runner = RecordingRunner(fn=fn)
    sizes = [1, 3, 2, 2]
    async with BatchQueue(runner, config()) as queue:
        results = await asyncio.gather(*(queue.submit(rows_of(i + 1, n)) for i, n in enumerate(sizes)))
    assert runner.rows == [8]
    for i, (n, result) in enumerate(zip(sizes, results, strict=True)):
        np.testing.assert_array_equal(result["y"], np.full((n, 3), 2 * (i + 1), dtype=np.float32))
        np.testing.assert_array_equal(result["total"], np.full((n, 1), 3 * (i + 1), dtype=np.float32))


async def test_batches_never_exceed_max_batch_size():
    runner = RecordingRunner()
    async with BatchQueue(runner, config(max_batch_size=4)) as queue:
        results = await asyncio.gather(*(queue.submit(rows_of(i)) for i in range(12)))
    assert runner.rows == [4, 4, 4]
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(12)]


async def test_request_larger_than_max_batch_size_runs_alone_and_whole():
    runner = RecordingRunner(hold_first=True)
    async with BatchQueue(runner, config(max_batch_size=4, max_queue_delay_ms=0)) as queue:
        gate = asyncio.create_task(queue.submit(rows_of(0)))
        await runner.wait_started()
        big, small_a, small_b = (asyncio.create_task(queue.submit(rows_of(v, n))) for v, n in [(1, 6), (2, 1), (3, 1)])
        await eventually(lambda: queue.depth == 3)
        runner.release.set()
        await asyncio.gather(gate, small_a, small_b)
        assert (await big)["y"].shape == (6, 3)
    assert runner.rows == [1, 6, 2]


async def test_lone_request_waits_for_the_delay_then_runs():
    runner = RecordingRunner()
    async with BatchQueue(runner, config(max_queue_delay_ms=30)) as queue:
        begin = time.monotonic()
        await queue.submit(rows_of(1))
        assert time.monotonic() - begin >= 0.03
    assert runner.rows == [1]


async def test_full_batch_executes_without_waiting_for_the_delay():
    runner = RecordingRunner()
    async with BatchQueue(runner, config(max_batch_size=2)) as queue:
        first = asyncio.create_task(queue.submit(rows_of(1)))
        await eventually(lambda: queue.depth == 1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert runner.calls == []  # still collecting
        await asyncio.wait_for(asyncio.gather(first, queue.submit(rows_of(2))), timeout=2)
    assert runner.rows == [2]


async def test_next_batch_collects_while_one_executes():
    runner = RecordingRunner(hold_first=True)
    async with BatchQueue(runner, config(max_queue_delay_ms=0)) as queue:
        gate = asyncio.create_task(queue.submit(rows_of(0)))
        await runner.wait_started()
        waiting = [asyncio.create_task(queue.submit(rows_of(v))) for v in (1, 2, 3)]
        await eventually(lambda: queue.depth == 3)
        runner.release.set()
        await asyncio.gather(gate, *waiting)
    assert runner.rows == [1, 3]


async def test_full_queue_refuses_at_once():
    runner = RecordingRunner(hold_first=True)
    async with BatchQueue(runner, config(max_batch_size=1, max_queue_depth=2), name="m") as queue:
        running = asyncio.create_task(queue.submit(rows_of(0)))
        await runner.wait_started()
        queued = [asyncio.create_task(queue.submit(rows_of(v))) for v in (1, 2)]
        await eventually(lambda: queue.depth == 2)
        with pytest.raises(ResourceExhausted, match="max_queue_depth=2"):
            await queue.submit(rows_of(99))
        runner.release.set()
        await asyncio.gather(running, *queued)
    assert runner.seen() == {0, 1, 2}


async def test_deadline_passed_before_queueing_is_refused_and_never_runs():
    runner = RecordingRunner()
    async with BatchQueue(runner, config(max_batch_size=1)) as queue:
        with pytest.raises(DeadlineExceeded):
            await queue.submit(rows_of(99), deadline=time.monotonic() - 0.001)
        await queue.submit(rows_of(1))
    assert runner.seen() == {1}


@pytest.mark.parametrize("max_batch_size", [1, 4], ids=["expires-in-queue", "expires-in-forming-batch"])
async def test_deadline_passing_while_queued_fails_without_running(max_batch_size: int):
    runner = RecordingRunner(hold_first=True)
    async with BatchQueue(runner, config(max_batch_size=max_batch_size, max_queue_delay_ms=0)) as queue:
        running = asyncio.create_task(queue.submit(rows_of(0)))
        await runner.wait_started()
        patient = asyncio.create_task(queue.submit(rows_of(1)))
        await eventually(lambda: queue.depth == 1)
        with pytest.raises(DeadlineExceeded):
            await queue.submit(rows_of(99), deadline=time.monotonic() + 0.02)
        assert queue.depth == 1
        runner.release.set()
        await asyncio.gather(running, patient)
    assert runner.seen() == {0, 1}


@pytest.mark.parametrize("max_batch_size", [1, 4], ids=["cancelled-in-queue", "cancelled-in-forming-batch"])
async def test_cancelled_request_is_never_executed(max_batch_size: int):
    runner = RecordingRunner(hold_first=True)
    async with BatchQueue(runner, config(max_batch_size=max_batch_size, max_queue_delay_ms=0)) as queue:
        running = asyncio.create_task(queue.submit(rows_of(0)))
        await runner.wait_started()
        patient = asyncio.create_task(queue.submit(rows_of(1)))
        doomed = asyncio.create_task(queue.submit(rows_of(99)))
        await eventually(lambda: queue.depth == 2)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert queue.depth == 1
        runner.release.set()
        await asyncio.gather(running, patient)
    assert runner.seen() == {0, 1}


async def test_runner_error_reaches_every_request_of_the_batch_and_the_queue_keeps_working():
    def fn(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (d["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": d["x"] * 2}

    runner = RecordingRunner(fn=fn)
    async with BatchQueue(runner, config(max_batch_size=2)) as queue:
        results = await asyncio.gather(queue.submit(rows_of(1)), queue.submit(rows_of(-1)), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results) and results[0] is results[1]
        ok = await asyncio.gather(queue.submit(rows_of(2)), queue.submit(rows_of(3)))
    assert [float(r["y"][0, 0]) for r in ok] == [4.0, 6.0]
    assert runner.rows == [2, 2]


async def test_disabled_batching_runs_each_request_alone():
    runner = RecordingRunner()
    async with BatchQueue(runner, config(enabled=False)) as queue:
        results = await asyncio.gather(*(queue.submit(rows_of(i)) for i in range(4)))
        scalar = await queue.submit({"x": np.float32(5)})  # no batch dimension needed when nothing is merged
    assert [call["x"].shape for call in runner.calls] == [(1, 3)] * 4 + [()]
    assert [float(r["y"][0, 0]) for r in results] == [0.0, 2.0, 4.0, 6.0]
    assert float(scalar["y"]) == 10.0


async def test_inputs_without_a_shared_batch_dimension_are_refused():
    async with BatchQueue(RecordingRunner(), config()) as queue:
        with pytest.raises(InvalidArgument):
            await queue.submit({"x": np.float32(5)})
        with pytest.raises(InvalidArgument):
            await queue.submit({"x": np.zeros((2, 3)), "w": np.zeros((3, 3))})


async def test_incompatible_requests_are_not_merged_and_keep_fifo_order():
    runner = RecordingRunner(hold_first=True, fn=lambda d: {"y": d["x"] * 2})
    requests = {
        "a": {"x": np.full((1, 3), 1, np.float32)},
        "other_shape": {"x": np.full((1, 4), 2, np.float32)},
        "c": {"x": np.full((2, 3), 3, np.float32)},
        "other_dtype": {"x": np.full((1, 3), 4, np.float64)},
        "other_names": {"x": np.full((1, 3), 5, np.float32), "w": np.zeros((1, 3), np.float32)},
    }
    async with BatchQueue(runner, config(max_queue_delay_ms=0)) as queue:
        gate = asyncio.create_task(queue.submit(rows_of(0)))
        await runner.wait_started()
        tasks = {key: asyncio.create_task(queue.submit(inputs)) for key, inputs in requests.items()}
        await eventually(lambda: queue.depth == len(requests))
        runner.release.set()
        await gate
        for key, task in tasks.items():
            np.testing.assert_array_equal((await task)["y"], requests[key]["x"] * 2)
    executed = [sorted({float(v) for v in call["x"].ravel()}) for call in runner.calls]
    assert executed == [[0.0], [1.0, 3.0], [2.0], [4.0], [5.0]]


async def test_close_with_drain_finishes_waiting_requests_then_refuses():
    runner = RecordingRunner(hold_first=True)
    queue = BatchQueue(runner, config(max_batch_size=1))
    await queue.start()
    tasks = [asyncio.create_task(queue.submit(rows_of(v))) for v in (0, 1, 2)]
    await runner.wait_started()
    await eventually(lambda: queue.depth == 2)
    closing = asyncio.create_task(queue.close(drain=True))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done()  # waits for the work it drains
    runner.release.set()
    await closing
    assert [float(r["y"][0, 0]) for r in await asyncio.gather(*tasks)] == [0.0, 2.0, 4.0]
    with pytest.raises(Unavailable):
        await queue.submit(rows_of(3))
    assert runner.seen() == {0, 1, 2}


async def test_close_without_drain_fails_waiting_requests_and_lets_the_running_batch_finish():
    runner = RecordingRunner(hold_first=True)
    queue = BatchQueue(runner, config(max_batch_size=1))
    await queue.start()
    running = asyncio.create_task(queue.submit(rows_of(0)))
    await runner.wait_started()
    waiting = [asyncio.create_task(queue.submit(rows_of(v))) for v in (1, 2)]
    await eventually(lambda: queue.depth == 2)
    closing = asyncio.create_task(queue.close(drain=False))
    for task in waiting:
        with pytest.raises(Unavailable, match="unloading"):
            await task
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done()  # waits for the running batch
    runner.release.set()
    await closing
    assert float((await running)["y"][0, 0]) == 0.0
    assert runner.seen() == {0}


async def test_submit_before_start_is_refused():
    with pytest.raises(Unavailable, match="not started"):
        await BatchQueue(RecordingRunner(), config()).submit(rows_of(1))


async def test_timing_is_filled_for_trace_spans():
    queue = BatchQueue(lambda d: {"y": d["x"] * 2}, BatchingConfig(max_batch_size=8, max_queue_delay_ms=20))
    async with queue:
        timings = [RequestTiming() for _ in range(3)]
        await asyncio.gather(*(queue.submit({"x": np.ones((1, 2), np.float32)}, timing=t) for t in timings))
    for timing in timings:
        assert 0 < timing.enqueued_ns <= timing.started_ns <= timing.finished_ns
        assert (timing.batch_requests, timing.batch_rows) == (3, 3)


# ---- low load: inline runs on the caller's path ------------------------------------------------------------------


def inline_config(**overrides) -> BatchingConfig:
    return BatchingConfig(**{"max_batch_size": 8, "max_queue_delay_ms": 0, "inline_when_idle": True, **overrides})


async def run_sequentially(queue: BatchQueue, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        result = await queue.submit(rows_of(i))
        np.testing.assert_array_equal(result["y"], np.full((1, 3), 2 * i, dtype=np.float32))


async def test_an_idle_model_runs_requests_inline_on_the_loop_thread_with_a_probe_through_the_executor():
    runner, observer = RecordingRunner(), RecordingObserver()
    async with BatchQueue(runner, inline_config(), observer=observer) as queue:
        await run_sequentially(queue, INLINE_AFTER_IDLE)  # the queue starts in batching mode
        assert queue.inline_executions == 0
        await run_sequentially(queue, 4 * INLINE_PROBE_EVERY, start=100)
    probes = 4
    assert queue.inline_executions == 4 * INLINE_PROBE_EVERY - probes
    assert threading.get_ident() in runner.threads  # inline runs
    assert len(runner.threads) == 2  # and the executor's thread: the first requests and the probes
    assert len(observer.batches) == INLINE_AFTER_IDLE + 4 * INLINE_PROBE_EVERY  # inline runs are observed too
    assert all(requests == 1 for _, requests, _, _ in observer.batches)


async def test_batching_takes_over_when_requests_overlap_and_inline_comes_back_when_they_stop():
    def slow(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.002)
        return {"y": d["x"] * 2}

    runner, observer = RecordingRunner(fn=slow), RecordingObserver()
    async with BatchQueue(runner, inline_config(), observer=observer) as queue:
        await run_sequentially(queue, INLINE_AFTER_IDLE + 2)
        assert queue.inline_executions == 2
        before = queue.inline_executions
        results = await asyncio.gather(*(queue.submit(rows_of(i)) for i in range(64)))
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(64)]
        # At most the requests before the next probe ran inline; the probe's execution showed the load.
        assert queue.inline_executions - before < INLINE_PROBE_EVERY
        assert max(requests for _, requests, _, _ in observer.batches) > 1
        after_load = queue.inline_executions
        await run_sequentially(queue, INLINE_AFTER_IDLE + 3)
        assert queue.inline_executions == after_load + 3


@pytest.mark.parametrize(
    "overrides",
    [{"max_queue_delay_ms": 1.0}, {"inline_when_idle": False}, {"inline_max_exec_ms": 1.0}],
    ids=["queue-delay", "off", "slow-model"],
)
async def test_no_inline_runs_with_a_queue_delay_when_off_or_for_a_slow_model(overrides):
    def slow(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.003)
        return {"y": d["x"] * 2}

    runner = RecordingRunner(fn=slow)
    async with BatchQueue(runner, inline_config(**overrides)) as queue:
        await run_sequentially(queue, 3 * INLINE_AFTER_IDLE)
    assert queue.inline_executions == 0
    assert threading.get_ident() not in runner.threads


async def test_an_inline_request_that_fails_raises_its_error_and_the_queue_keeps_serving():
    def fn(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if float(d["x"][0, 0]) == 13:
            raise ValueError("bad row")
        return {"y": d["x"] * 2}

    async with BatchQueue(RecordingRunner(fn=fn), inline_config()) as queue:
        await run_sequentially(queue, INLINE_AFTER_IDLE + 1)
        with pytest.raises(ValueError, match="bad row"):
            await queue.submit(rows_of(13))
        assert queue.inline_executions == 2
        await run_sequentially(queue, 3, start=20)
        assert queue.inline_executions == 5
