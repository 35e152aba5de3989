"""The kit's stream follower (reconnects with backoff and jitter, resyncs on every connection) and the mapping of
failed calls to domain errors."""

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from redis import exceptions as redis_errors

from modelgrid.client import errors
from modelgrid.client.convert import ref_from_pb, ref_to_pb, seconds_of, timestamp
from modelgrid.client.modelref import ModelRef
from modelgrid.client.rpc_errors import domain_error, rpc_errors
from services.kit.interceptors import ErrorMappingInterceptor
from services.kit.streams import Backoff, StreamFollower


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    ],
)
def test_codes_about_the_request_keep_the_callees_message(code, error):
    mapped = domain_error(_rpc_error(code, "model m has no alias prod"), "registry")
    assert type(mapped) is error
    assert str(mapped) == "model m has no alias prod"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_other_failures_are_unavailable_without_the_callees_internals(code):
    mapped = domain_error(_rpc_error(code, "stack trace at 198.18.0.7"), "registry")
    assert type(mapped) is errors.Unavailable
    assert "198.18.0.7" not in str(mapped)
    assert "registry" in str(mapped) and code.name in str(mapped)


def test_rpc_errors_reraises_as_domain_error_with_the_cause():
    original = _rpc_error(grpc.StatusCode.NOT_FOUND, "no such model")
    with pytest.raises(errors.NotFound) as caught, rpc_errors("registry"):
        raise original
    assert caught.value.__cause__ is original


def test_model_refs_and_timestamps_round_trip():
    for text in ("digits", "digits:3", "digits@production"):
        assert ref_from_pb(ref_to_pb(text)) == ModelRef.parse(text)
    assert seconds_of(timestamp(1700000000.25)) == pytest.approx(1700000000.25, abs=1e-6)


def test_backoff_grows_to_its_maximum_with_jitter_and_resets():
    backoff = Backoff(initial=1.0, maximum=8.0, multiplier=2.0, jitter=0.25)
    waits = [backoff.next() for _ in range(6)]
    for wait, nominal in zip(waits, [1, 2, 4, 8, 8, 8], strict=True):
        assert nominal * 0.75 <= wait <= nominal * 1.25
    assert len({round(w, 6) for w in waits[3:]}) > 1  # jittered, not identical
    backoff.reset()
    assert 0.75 <= backoff.next() <= 1.25


async def test_follower_resyncs_on_every_connection_and_resumes_from_the_callers_cursor():
    log: list[str] = []
    received: list[int] = []
    cursor = {"at": 0}
    connections = {"n": 0}

    def open_stream():
        connections["n"] += 1
        start, broken = cursor["at"], connections["n"] == 1

        async def items():
            for i in range(start + 1, start + 4):
                yield i
            if broken:
                raise errors.Unavailable("registry failed (UNAVAILABLE)")
            await asyncio.Event().wait()  # the second connection stays open

        return items()

    async def on_item(item: int) -> None:
        received.append(item)
        cursor["at"] = item

    async def on_connect() -> None:
        log.append(f"connect from {cursor['at']}")

    follower = StreamFollower(
        "test", open_stream, on_item, on_connect=on_connect, backoff=Backoff(initial=0.01, maximum=0.05)
    )
    follower.start()
    try:
        await asyncio.wait_for(follower.ready.wait(), 5)
        for _ in range(200):
            if len(received) >= 6:
                break
            await asyncio.sleep(0.01)
    finally:
        await follower.stop()
    assert received == [1, 2, 3, 4, 5, 6]
    assert log == ["connect from 0", "connect from 3"]


async def test_follower_keeps_retrying_while_the_source_is_down_and_stops_cleanly():
    attempts = 0

    def open_stream():
        nonlocal attempts
        attempts += 1
        raise LookupError("no healthy instance of registry")

    async def on_item(item) -> None:
        raise AssertionError("no item expected")

    follower = StreamFollower("down", open_stream, on_item, backoff=Backoff(initial=0.01, maximum=0.02))
    follower.start()
    await asyncio.sleep(0.3)
    await follower.stop()
    assert attempts >= 5
    assert not follower.ready.is_set()


async def test_a_follower_outlives_an_unexpected_error_of_its_callbacks():
    """A follower lives as long as its process: an error no one expected (here Redis going away under on_item) is
    logged, and the stream is opened again after the caller's cursor."""
    received: list[int] = []
    cursor = {"at": 0}
    failed = []

    def open_stream():
        start = cursor["at"]

        async def items():
            for i in range(start + 1, 6):
                yield i
            await asyncio.Event().wait()

        return items()

    async def on_item(item: int) -> None:
        if item == 3 and not failed:
            failed.append(item)
            raise redis_errors.ConnectionError("Error 111 connecting to 198.18.0.7:6379")
        received.append(item)
        cursor["at"] = item

    follower = StreamFollower("unexpected", open_stream, on_item, backoff=Backoff(initial=0.01, maximum=0.02))
    follower.start()
    try:
        for _ in range(300):
            if len(received) >= 5:
                break
            await asyncio.sleep(0.01)
    finally:
        await follower.stop()
    assert received == [1, 2, 3, 4, 5] and failed == [3]


class _Aborted(Exception):
    pass


class _Context:
    """What the interceptor's wrapper uses of a ServicerContext: abort(code, details), which raises."""

    code: grpc.StatusCode | None = None
    details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


async def _status_through_interceptor(exc: Exception, method: str, *, stream: bool) -> tuple[grpc.StatusCode, str]:
    """The status a server answers when its servicer (a unary or a server-streaming one, after one message)
    raises `exc`."""

    async def unary(request, context):
        raise exc

    async def streaming(request, context):
        yield "first"
        raise exc

    if stream:
        handler = grpc.unary_stream_rpc_method_handler(streaming)
    else:
        handler = grpc.unary_unary_rpc_method_handler(unary)

    async def continuation(details):
        return handler

    wrapped = await ErrorMappingInterceptor().intercept_service(continuation, SimpleNamespace(method=method))
    context = _Context()
    with pytest.raises(_Aborted):
        if stream:
            assert [m async for m in wrapped.unary_stream(None, context)] == ["first"]
        else:
            await wrapped.unary_unary(None, context)
    return context.code, context.details


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("exc", "state"),
    [
        (redis_errors.ConnectionError("Error 111 connecting to 198.18.0.7:6379."), "is unreachable"),
        (redis_errors.BusyLoadingError("loading the dataset"), "is loading its data after a restart"),
        (redis_errors.TimeoutError("Timeout reading from 198.18.0.7:6379"), "does not answer"),
    ],
)
async def test_a_redis_outage_is_unavailable_with_an_actionable_message_without_internals(exc, state, stream):
    code, details = await _status_through_interceptor(
        exc, "/modelgrid.registry.v1.ModelRegistry/SetAlias", stream=stream
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == f"the registry's state store (Redis) {state}; retry in a few seconds"
    assert "198.18.0.7" not in details


async def test_wrong_redis_credentials_are_no_outage_and_stay_internal():
    exc = redis_errors.AuthenticationError("invalid username-password pair")
    code, details = await _status_through_interceptor(exc, "/modelgrid.trainer.v1.Trainer/ListJobs", stream=False)
    assert code == grpc.StatusCode.INTERNAL and "invalid" not in details


class _PassThrough(grpc.aio.UnaryUnaryClientInterceptor):
    """Any client interceptor (tracing adds one to every pooled channel) runs a call as a task of its own."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(client_call_details, request)


async def _server(handlers: dict) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_follower_outlives_a_call_cancelled_under_it_by_its_channels_close():
    """The channel pool closes the channel of an instance that left Consul; grpc.aio then cancels the calls it
    finds on it, and the task awaiting one gets CancelledError. Before, that ended the follower for good, and the
    predictor never heard of the registry again. It must count as a broken stream, while stop() still stops."""
    entered = asyncio.Event()

    async def hang(request: bytes, context) -> bytes:
        entered.set()
        await asyncio.Event().wait()

    async def watch(request: bytes, context):
        yield b"event"
        await asyncio.Event().wait()

    handlers = {
        "Hang": grpc.unary_unary_rpc_method_handler(hang),
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
    }
    server, target = await _server(handlers)
    channels: list[grpc.aio.Channel] = []
    received: list[bytes] = []

    def open_stream():
        channels.append(grpc.aio.insecure_channel(target, interceptors=[_PassThrough()]))
        return channels[-1].unary_stream("/t.S/Watch")(b"")

    async def on_connect() -> None:  # the first resync waits on the registry when the channel closes
        if len(channels) == 1:
            await channels[0].unary_unary("/t.S/Hang")(b"", timeout=30)

    async def on_item(item: bytes) -> None:
        received.append(item)

    follower = StreamFollower(
        "closed", open_stream, on_item, on_connect=on_connect, backoff=Backoff(initial=0.01, maximum=0.02)
    )
    follower.start()
    try:
        await asyncio.wait_for(entered.wait(), 5)
        await channels[0].close()  # as InstancePool does once the grace period after leaving has passed
        for _ in range(300):
            if received:
                break
            await asyncio.sleep(0.01)
        assert received == [b"event"] and len(channels) == 2
        await follower.stop()
        assert follower._task.cancelled()
    finally:
        await follower.stop()
        for channel in channels:
            await channel.close()
        await server.stop(None)


async def test_a_quiet_stream_is_opened_again_and_resyncs_after_resync_seconds():
    """A stream can hang on a connection that died without a word, or a change can reach no stream: with
    `resync_seconds` the follower opens it again (resyncing) when it delivered nothing for that long."""
    opened: list[int] = []
    resyncs: list[int] = []

    def open_stream():
        opened.append(len(opened))

        async def items():
            if len(opened) == 1:
                yield 1  # an item restarts the quiet period
            await asyncio.Event().wait()  # then nothing, ever

        return items()

    async def on_connect() -> None:
        resyncs.append(len(opened))

    async def on_item(item: int) -> None:
        pass

    with pytest.raises(ValueError, match="resync_seconds"):
        StreamFollower("bad", open_stream, on_item, resync_seconds=0)
    follower = StreamFollower("quiet", open_stream, on_item, on_connect=on_connect, resync_seconds=0.1)
    follower.start()
    try:
        await asyncio.sleep(0.55)
    finally:
        await follower.stop()
    assert 3 <= len(opened) <= 7, opened  # about every 0.1 s, and at once (no backoff: nothing failed)
    assert resyncs == [n + 1 for n in range(len(opened))]


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_stop_ends_a_follower_whose_item_arrives_with_the_cancel(turns):
    """stop() as an item arrives, `turns` loop turns apart: Python 3.11's wait_for lost such a cancel, and the
    follower (and the service's shutdown) then never ended."""
    queue: asyncio.Queue[int] = asyncio.Queue()

    def open_stream():
        async def items():
            while True:
                yield await queue.get()

        return items()

    async def on_item(item: int) -> None:
        pass

    follower = StreamFollower("racing", open_stream, on_item, resync_seconds=30)
    follower.start()
    await asyncio.sleep(0.05)
    queue.put_nowait(1)
    for _ in range(turns):
        await asyncio.sleep(0)
    await asyncio.wait_for(follower.stop(), 2)
    assert follower._task.done()
