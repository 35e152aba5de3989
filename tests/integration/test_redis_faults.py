"""Redis faults under the registry, with a Redis server of this module's own (AOF on, appendfsync everysec, RDB off)
so that no other test sees it die: `kill -9` in the middle of writes and of followed event streams, then a restart on
the same port and data dir (the AOF is replayed).

Asserted: every write the client saw acknowledged is there afterwards and nothing is half-written (versions numbered
without gaps, each with its record, its blob and its one event); writes and streams that met the outage failed with
UNAVAILABLE and a message naming the state store, never INTERNAL; the registry answers within 5 s of Redis answering
PING; and every follower of the event stream (a raw WatchEvents caller, the predictor's follower, the gateway's
canary weights) resumes after its cursor: each event after the restart reaches it, none is lost or delivered twice.
"""

import asyncio
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest
import redis

from modelgrid.client.registry import AsyncRegistryClient
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.gateway.canary import CanaryWeights
from services.kit import tls
from services.kit.channels import InstancePool
from services.kit.localinfra import RedisServer
from services.kit.redis_client import create_redis
from services.kit.streams import Backoff
from services.predictor.follower import RegistryFollower

RECOVERY_LIMIT_S = 5.0  # the registry answers within this long of Redis answering PING (issue 14)
OUTAGE_S = 6.0  # longer than redis-py's own retries (about 3.5 s): calls and streams really fail meanwhile
STATE_STORE = "state store (Redis)"
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[RedisServer]:
    # "always": a reply is never sent before its AOF write, so "every acknowledged write survives kill -9" holds
    # even when the shared disk is slow to fsync.
    with RedisServer(tmp_path_factory.mktemp("redis-faults"), appendfsync="always") as server:
        yield server


@pytest.fixture
def faulty_registry(consul, own_redis, launch, tmp_path):
    """A registry on this module's Redis, out of Consul (no other test's client may pick it while Redis is down)."""
    process = launch.registry(consul.http_url, own_redis.url, tmp_path, CONSUL_ENABLED="false")
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def redis_back(own_redis) -> Iterator[None]:
    """Whatever a test did, this module's Redis runs again after it (same port, same data dir)."""
    yield
    if own_redis.pid is None:
        own_redis.start()


@contextmanager
def redis_killed(server: RedisServer) -> Iterator[None]:
    """kill -9 of Redis at the start of the block; the test starts it again (and measures how long the service
    takes to answer after that), or `redis_back` does."""
    server.kill()
    yield


def restart_and_time(server: RedisServer, answers: Callable[[], bool], what: str) -> float:
    """Starts the killed Redis (which returns once it answers PING, its AOF replayed) and returns the seconds from
    then until `answers()` is true; asserts the limit of issue 14."""
    server.start()
    pinged = time.monotonic()
    while not answers():
        assert time.monotonic() - pinged < 30, f"{what} never answered again after Redis came back"
        time.sleep(0.02)
    recovery = time.monotonic() - pinged
    print(f"\n{what} answered {recovery:.3f}s after Redis answered PING")
    assert recovery < RECOVERY_LIMIT_S, f"{what} took {recovery:.2f}s to answer after Redis came back"
    return recovery


def assert_state_store_unavailable(code: grpc.StatusCode, details: str, server: RedisServer) -> None:
    assert code == grpc.StatusCode.UNAVAILABLE, f"{code.name}: {details}"
    assert STATE_STORE in details and "retry" in details, details
    assert str(server.port) not in details and "Error" not in details, f"internals in the message: {details}"


def store_keys(process) -> Callable[[str], str]:
    prefix = process.env["MODELGRID_REGISTRY_REDIS_KEY_PREFIX"]
    return lambda name, part="": f"{prefix}model:{name}" + (f":{part}" if part else "")


# -- durability and consistency of writes across kill -9 ---------------------------------------------------------


@dataclass
class Writes:
    """What a writer saw: acknowledged versions (request id -> (number, digest)), acknowledged alias moves, the
    request ids and digests of versions whose outcome it does not know, and every failure as (code, details, when)."""

    versions: dict[str, tuple[int, str]] = field(default_factory=dict)
    moves: list[int] = field(default_factory=list)
    unknown: dict[str, bytes] = field(default_factory=dict)
    failures: list[tuple[grpc.StatusCode, str, float]] = field(default_factory=list)
    acks: int = 0


def _create_version(stub, model: str, request_id: str, data: bytes) -> pb.ModelVersion:
    meta = pb.VersionMetadata(
        model_name=model,
        artifact_digest=hashlib.sha256(data).hexdigest(),
        artifact_size=len(data),
        request_id=request_id,
    )
    messages = [pb.CreateVersionRequest(metadata=meta), pb.CreateVersionRequest(chunk=data)]
    return stub.CreateVersion(iter(messages), timeout=20)


def _writer(stub, model: str, writes: Writes, stop: threading.Event, max_ops: int, max_seconds: float) -> None:
    """Creates versions and moves the alias "prod" to the newest acknowledged one, one call at a time, until told
    to stop, `max_ops` calls or `max_seconds`."""
    end = time.monotonic() + max_seconds
    for op in range(max_ops):
        if stop.is_set() or time.monotonic() > end:
            return
        try:
            if op % 2 == 0 or not writes.versions:
                request_id, data = f"w-{op}-{uuid.uuid4().hex[:6]}", os.urandom(2048)
                writes.unknown[request_id] = data
                version = _create_version(stub, model, request_id, data)
                del writes.unknown[request_id]
                writes.versions[request_id] = (version.version, version.artifact.digest)
            else:
                target = max(number for number, _ in writes.versions.values())
                stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="prod", version=target), timeout=20)
                writes.moves.append(target)
            writes.acks += 1
        except grpc.RpcError as err:
            writes.failures.append((err.code(), err.details() or "", time.monotonic()))


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


def test_kill_9_of_redis_mid_writes_keeps_every_acknowledged_write_and_half_writes_none(
    faulty_registry, own_redis, client_for, unique
):
    channel, client = client_for(faulty_registry)
    stub = client.stub
    model = unique("aof")
    stub.CreateModel(pb.CreateModelRequest(name=model))
    writes, stop = Writes(), threading.Event()
    writer = threading.Thread(target=_writer, args=(stub, model, writes, stop, 400, 90.0), daemon=True)
    writer.start()
    try:
        _wait(lambda: writes.acks >= 12, "a dozen acknowledged writes before the kill")
        with redis_killed(own_redis):
            killed = time.monotonic()
            _wait(lambda: writes.failures, "a write failing while Redis is down", timeout=20)
            # A call of our own while Redis is down: a read, with the message a user gets.
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetModel(pb.GetModelRequest(name=model), timeout=20)
            assert_state_store_unavailable(caught.value.code(), caught.value.details(), own_redis)
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
            acked_before_restart = writes.acks

        def registry_answers() -> bool:
            try:
                stub.GetModel(pb.GetModelRequest(name=model), timeout=2)
                return True
            except grpc.RpcError:
                return False

        restart_and_time(own_redis, registry_answers, "the registry")
        answered = time.monotonic()
        _wait(lambda: writes.acks >= acked_before_restart + 8, "writes acknowledged again after the restart")
    finally:
        stop.set()
        writer.join(30)
    assert not writer.is_alive()

    # Failures: only while Redis was away, all UNAVAILABLE with an actionable message (never INTERNAL/UNKNOWN).
    assert writes.failures
    for code, details, when in writes.failures:
        assert_state_store_unavailable(code, details, own_redis)
        assert when < answered + RECOVERY_LIMIT_S, f"a write failed well after the registry answered: {details}"

    # A write whose outcome is unknown is retried with its request id: at most one version per write, ever.
    for request_id, data in list(writes.unknown.items()):
        version = _create_version(stub, model, request_id, data)
        assert version.artifact.digest == hashlib.sha256(data).hexdigest()
        writes.versions[request_id] = (version.version, version.artifact.digest)
    for request_id, (number, digest) in writes.versions.items():
        again = _create_version(stub, model, request_id, b"ignored: the request id was seen")
        assert (again.version, again.artifact.digest) == (number, digest), f"request {request_id} created twice"

    # Every acknowledged version is there, complete, with its blob; numbers run 1..latest without a gap or a twin.
    listed = {v.version: v for v in stub.ListVersions(pb.ListVersionsRequest(model_name=model)).versions}
    registered = stub.GetModel(pb.GetModelRequest(name=model))
    assert sorted(listed) == list(range(1, registered.latest_version + 1))
    for number, digest in writes.versions.values():
        assert listed[number].artifact.digest == digest
    assert len({v.artifact.digest for v in listed.values()}) == len(listed), "one write became two versions"
    for version in listed.values():
        assert version.status == pb.VERSION_STATUS_READY and version.artifact.size_bytes == 2048
        blob = stub.StatBlob(pb.StatBlobRequest(digest=version.artifact.digest))
        assert blob.size_bytes == 2048
    # The alias: where the last acknowledged move put it (every move after the restart was acknowledged).
    assert registered.aliases["prod"] == writes.moves[-1]

    # State and events agree: each version has exactly one VERSION_CREATED event, each acknowledged move its event.
    history, token = [], ""
    while True:
        request = pb.GetHistoryRequest(model_name=model)
        request.page.page_size, request.page.page_token = 1000, token
        page = stub.GetHistory(request)
        history += page.events
        if not (token := page.page.next_page_token):
            break
    created = sorted(e.version for e in history if e.type == pb.EVENT_TYPE_VERSION_CREATED)
    assert created == sorted(listed)
    moved = [e.version for e in history if e.type == pb.EVENT_TYPE_ALIAS_SET]
    assert len(moved) >= len(writes.moves) and moved[-1] == writes.moves[-1]
    assert set(moved) <= set(listed)

    # And in Redis itself: the counter, the version records and the request ids tell one story.
    key = store_keys(faulty_registry)
    with redis.Redis.from_url(own_redis.url, decode_responses=True) as direct:
        seq = int(direct.get(key(model, "seq")))
        records = direct.hgetall(key(model, "versions"))
        request_ids = direct.hgetall(key(model, "requests"))
    assert seq == registered.latest_version and sorted(map(int, records)) == list(range(1, seq + 1))
    for number, raw in records.items():
        assert json.loads(raw)["version"] == int(number)
    assert sorted(map(int, request_ids.values())) == list(range(1, seq + 1))
    print(f"{writes.acks} writes acknowledged, {len(writes.failures)} failed while Redis was down, {seq} versions")
    channel.close()


# -- followers of the event stream ---------------------------------------------------------------------------------


class RecordingControl:
    """Stands in for the predictor's ModelControl: serves every model whose name starts with `prefix`, records the
    refreshes the follower asks for."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.refreshed: list[str] = []
        self.resyncs = 0

    def is_served(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def refresh(self, name: str) -> None:
        self.refreshed.append(name)

    def refresh_all(self) -> None:
        self.resyncs += 1


async def _eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Waits until `condition()`; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"never happened: {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _read(call, into: list, errors: list) -> None:
    """Reads a WatchEvents call into `into` until it ends; its error (if any) goes to `errors`."""
    try:
        async for event in call:
            into.append(event)
    except grpc.aio.AioRpcError as err:
        errors.append(err)


async def test_redis_kill_under_followed_streams_ends_them_unavailable_and_each_resumes_after_its_cursor(
    faulty_registry, own_redis, unique, internal_tls_dir
):
    prefix = unique("follow")
    names = [f"{prefix}-{i}" for i in range(6)]
    channel = faulty_registry.channel(aio=True, options=FAST_RECONNECT)
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    operator = tls.InternalTLS(internal_tls_dir, "operator")
    pool = InstancePool(None, "registry", targets=[faulty_registry.target], options=FAST_RECONNECT, tls=operator)
    await pool.start()
    registry_client = AsyncRegistryClient(pool, client_id="pytest")
    follower_redis = create_redis(own_redis.url)
    cursor_key = f"mg:test-faults:{uuid.uuid4().hex[:8]}:cursor"
    control = RecordingControl(prefix)
    predictor_follower = RegistryFollower(
        registry_client, control, follower_redis, cursor_key, backoff=Backoff(initial=0.05, maximum=0.5)
    )
    canary = CanaryWeights(registry_client, "modelgrid.canary-weight")
    raw_events: list[pb.RegistryEvent] = []
    raw_errors: list[grpc.aio.AioRpcError] = []
    raw = asyncio.create_task(_read(stub.WatchEvents(pb.WatchEventsRequest(cursor="")), raw_events, raw_errors))
    # From the first event of this registry's (fresh) stream: "from now" would race with the first writes.
    await follower_redis.set(cursor_key, "0-0")
    await predictor_follower.start()
    canary.start()
    try:
        await asyncio.wait_for(predictor_follower.ready.wait(), 10)
        await asyncio.wait_for(canary.ready.wait(), 10)
        for name in names[:3]:
            await stub.CreateModel(pb.CreateModelRequest(name=name))
        weight = pb.UpdateModelRequest(name=names[0], set_tags={"modelgrid.canary-weight": "0.25"})
        await stub.UpdateModel(weight)
        await _eventually(lambda: control.refreshed == names[:3] + names[:1], "the events before the kill")
        await _eventually(lambda: canary.weights == {names[0]: 0.25}, "the canary weight before the kill")
        await _eventually(lambda: len(raw_events) == 4, "the raw stream's events before the kill")

        with redis_killed(own_redis):
            killed = time.monotonic()
            # A write meanwhile fails UNAVAILABLE with the state store's message (a model no follower serves).
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateModel(pb.CreateModelRequest(name=unique("outage")), timeout=20)
            assert_state_store_unavailable(caught.value.code(), caught.value.details(), own_redis)
            # The raw stream ends with UNAVAILABLE too: neither hanging nor INTERNAL.
            await asyncio.wait_for(raw, 20)
            assert len(raw_errors) == 1, "the stream ended without an error while Redis was down"
            assert_state_store_unavailable(raw_errors[0].code(), raw_errors[0].details(), own_redis)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))

        async def registry_answers() -> bool:
            try:
                await stub.GetModel(pb.GetModelRequest(name=names[0]), timeout=2)
                return True
            except grpc.aio.AioRpcError:
                return False

        await asyncio.to_thread(own_redis.start)
        pinged = time.monotonic()
        while not await registry_answers():
            assert time.monotonic() - pinged < 30, "the registry never answered again"
            await asyncio.sleep(0.02)
        recovery = time.monotonic() - pinged
        print(f"\nthe registry answered {recovery:.3f}s after Redis answered PING")
        assert recovery < RECOVERY_LIMIT_S

        # The raw caller resumes after the last cursor it saw: the events after the restart, nothing before.
        last_seen = raw_events[-1].cursor
        resumed: list[pb.RegistryEvent] = []
        resumed_errors: list[grpc.aio.AioRpcError] = []
        raw = asyncio.create_task(
            _read(stub.WatchEvents(pb.WatchEventsRequest(cursor=last_seen)), resumed, resumed_errors)
        )
        for name in names[3:]:
            await stub.CreateModel(pb.CreateModelRequest(name=name))
        await stub.UpdateModel(pb.UpdateModelRequest(name=names[0], set_tags={"modelgrid.canary-weight": "0"}))
        await stub.UpdateModel(pb.UpdateModelRequest(name=names[4], set_tags={"modelgrid.canary-weight": "0.5"}))

        expected = names[:3] + names[:1] + names[3:] + [names[0], names[4]]
        took = await _eventually(lambda: control.refreshed == expected, "the predictor follower's events")
        print(f"the predictor's follower had every event {took:.3f}s after they were written")
        took = await _eventually(lambda: canary.weights == {names[4]: 0.5}, "the canary weights after the restart")
        print(f"the gateway's canary weights were current {took:.3f}s after the changes were written")
        await _eventually(lambda: len(resumed) == 5, "the resumed raw stream's events")
        assert [e.model_name for e in resumed] == names[3:] + [names[0], names[4]]
        assert all(e.cursor > last_seen for e in resumed)
        await asyncio.sleep(1.0)  # anything delivered twice would have arrived by now
        assert control.refreshed == expected, "an event was lost or delivered twice"
        assert len(resumed) == 5 and not resumed_errors
        assert control.resyncs >= 2, "the follower did not reconnect (and resync) after the stream broke"
        # The predictor's cursor in Redis is the last event's: a restarted replica would resume right there.
        assert await follower_redis.get(cursor_key) == resumed[-1].cursor
    finally:
        raw.cancel()
        await asyncio.gather(raw, return_exceptions=True)
        await predictor_follower.stop()
        await canary.stop()
        await follower_redis.aclose()
        await pool.close()
        await channel.close()


async def test_the_predictors_follower_outlives_an_outage_of_the_redis_keeping_its_cursor(
    faulty_registry, own_redis, tmp_path, unique, internal_tls_dir
):
    """The predictor keeps its cursor in a Redis of its own here: events go on while that one is down, and the
    follower must go on processing them (storing the cursor again once its Redis is back), not die."""
    prefix = unique("cursor")
    names = [f"{prefix}-{i}" for i in range(4)]
    events_key = f"{faulty_registry.env['MODELGRID_REGISTRY_REDIS_KEY_PREFIX']}events"
    registry_redis = create_redis(own_redis.url)
    channel = faulty_registry.channel(aio=True)
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    pool = InstancePool(
        None, "registry", targets=[faulty_registry.target], tls=tls.InternalTLS(internal_tls_dir, "operator")
    )
    await pool.start()
    control = RecordingControl(prefix)
    cursor_key = f"mg:test-faults:{uuid.uuid4().hex[:8]}:cursor"

    async def last_event() -> str:
        return (await registry_redis.xrevrange(events_key, count=1))[0][0]

    with RedisServer(tmp_path / "cursor-redis") as cursor_redis:
        follower_redis = create_redis(cursor_redis.url)
        follower = RegistryFollower(
            AsyncRegistryClient(pool), control, follower_redis, cursor_key, backoff=Backoff(initial=0.05, maximum=0.5)
        )
        await follower_redis.set(cursor_key, "0-0")  # from the first event of this registry's (fresh) stream
        await follower.start()
        try:
            await asyncio.wait_for(follower.ready.wait(), 10)
            await stub.CreateModel(pb.CreateModelRequest(name=names[0]))
            await _eventually(lambda: control.refreshed == names[:1], f"the first event ({control.refreshed})")
            cursor_redis.kill()
            for name in names[1:3]:
                await stub.CreateModel(pb.CreateModelRequest(name=name))
            await _eventually(lambda: control.refreshed == names[:3], "the events while the cursor's Redis is down")
            await asyncio.to_thread(cursor_redis.start)
            await stub.CreateModel(pb.CreateModelRequest(name=names[3]))
            await _eventually(lambda: control.refreshed == names, "the event after its Redis came back")
            newest = await last_event()
            stored = None
            for _ in range(250):
                if (stored := await follower_redis.get(cursor_key)) == newest:
                    break
                await asyncio.sleep(0.02)
            assert stored == newest, "the cursor was not stored again once Redis was back"
            await asyncio.sleep(0.5)
            assert control.refreshed == names, "an event was lost or delivered twice"
        finally:
            await follower.stop()
            await follower_redis.aclose()
            await registry_redis.aclose()
            await pool.close()
            await channel.close()
