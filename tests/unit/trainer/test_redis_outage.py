"""A trainer (in this process, the real gRPC service) whose Redis is killed with -9 while a job trains on two
in-process agents running the stand-in worker, then started again on the same port and data dir (AOF replayed).

Asserted: the job trains on and succeeds without a restart (its runner waits out the outage instead of failing the
job); right after the restart the job's record and its event stream agree (no half-written job state); calls meanwhile
fail with UNAVAILABLE and a message naming the state store, never INTERNAL; the trainer answers within 5 s of Redis
answering PING; and a WatchJob caller that resumes after its last cursor (as the CLI does) gets every event once:
no step lost, none twice.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.kit.localinfra import RedisServer
from services.kit.redis_client import create_redis
from services.trainer.domain import Job
from services.trainer.main import start_trainer

pytestmark = pytest.mark.asyncio(loop_scope="session")

RECOVERY_LIMIT_S = 5.0
OUTAGE_S = 6.0  # longer than redis-py's own retries (about 3.5 s): the runner's saves really fail meanwhile
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
STEPS_PER_EPOCH, EPOCHS, REPORT_EVERY = 30, 3, 2


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("trainer-redis-outage")) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def trainer(consul, own_redis, trainer_settings, agents, registry) -> AsyncIterator[tuple[object, str]]:
    """Two one-slot agents and a trainer on this module's Redis; yields (Trainer stub, key prefix)."""
    await agents(slots=1)
    await agents(slots=1)
    settings = trainer_settings.model_copy(
        update={
            "redis_url": own_redis.url,
            "consul_url": consul.http_url,
            "registry_target": f"127.0.0.1:{registry.port}",
        }
    )
    service = await start_trainer(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    stub = trainer_pb2_grpc.TrainerStub(channel)
    try:
        deadline = time.monotonic() + 20
        while len((await stub.ListWorkers(pb.ListWorkersRequest())).workers) != 2:
            assert time.monotonic() < deadline, "the trainer never saw its two agents"
            await asyncio.sleep(0.05)
        yield stub, settings.redis_key_prefix
    finally:
        await channel.close()
        await service.stop()
        if own_redis.pid is None:
            own_redis.start()


def assert_state_store_unavailable(err: grpc.aio.AioRpcError, server: RedisServer) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{err.code().name}: {err.details()}"
    assert "trainer's state store (Redis)" in err.details() and "retry" in err.details(), err.details()
    assert str(server.port) not in err.details(), err.details()


async def watch(stub, job_id: str, events: list, broken: list) -> None:
    """Follows a job like `modelgrid jobs watch`: after UNAVAILABLE it calls again from the last cursor it saw."""
    cursor = ""
    while True:
        try:
            async for event in stub.WatchJob(pb.WatchJobRequest(id=job_id, cursor=cursor)):
                events.append(event)
                cursor = event.cursor
                if event.type == pb.JOB_EVENT_TYPE_STATE and event.state in FINAL:
                    return
        except grpc.aio.AioRpcError as err:
            broken.append(err)
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                return
        await asyncio.sleep(0.2)


async def job_as_stored(url: str, prefix: str, job_id: str) -> tuple[Job, dict]:
    """The job's record and its newest event, read in one MULTI (one consistent moment of the store)."""
    redis = create_redis(url)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(f"{prefix}job:{job_id}").xrevrange(f"{prefix}job:{job_id}:events", count=1)
            raw, newest = await pipe.execute()
    finally:
        await redis.aclose()
    return Job.from_json(raw), json.loads(newest[0][1]["event"])


async def test_a_job_trains_through_a_redis_kill_and_its_watcher_resumes_after_its_cursor(
    trainer, own_redis, digits_spec
):
    stub, prefix = trainer
    spec = digits_spec(step_delay_ms=100, report_every_steps=REPORT_EVERY, checkpoint_every_steps=10)
    spec.hyper_parameters.epochs = EPOCHS
    spec.recipe = "file:fake.py"  # written by trainer_settings: takes the fake worker's instructions as parameters
    spec.recipe_params.update({"steps_per_epoch": STEPS_PER_EPOCH})
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec, request_id=uuid.uuid4().hex))
    events: list[pb.JobEvent] = []
    broken: list[grpc.aio.AioRpcError] = []
    watcher = asyncio.create_task(watch(stub, job.id, events, broken))
    try:
        deadline = time.monotonic() + 30
        while not any(e.type == pb.JOB_EVENT_TYPE_STEP and e.step >= 6 for e in events):
            assert time.monotonic() < deadline and not watcher.done(), f"the job never trained: {events}"
            await asyncio.sleep(0.05)

        own_redis.kill()
        killed = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # a call that needs the store
            await stub.ListJobs(pb.ListJobsRequest(), timeout=20)
        assert_state_store_unavailable(caught.value, own_redis)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
        during = await stub.GetJob(pb.GetJobRequest(id=job.id))  # the runner's view: training went on
        assert during.state == pb.JOB_STATE_RUNNING and during.restarts == 0

        await asyncio.to_thread(own_redis.start)
        pinged = time.monotonic()
        # No half-written job state: the record and its newest event were written together, in one MULTI.
        stored, newest = await job_as_stored(own_redis.url, prefix, job.id)
        assert stored.state.value == newest["state"] and stored.attempt == newest["attempt"], (stored, newest)
        if newest["type"] in ("STEP", "EPOCH"):
            assert stored.step == newest["step"], (stored, newest)
        while True:
            try:
                await stub.ListJobs(pb.ListJobsRequest(), timeout=2)
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() - pinged < 30, "the trainer never answered again"
                await asyncio.sleep(0.02)
        recovery = time.monotonic() - pinged
        print(f"\nthe trainer answered {recovery:.3f}s after Redis answered PING")
        assert recovery < RECOVERY_LIMIT_S

        await asyncio.wait_for(watcher, 90)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    done = await stub.GetJob(pb.GetJobRequest(id=job.id))
    assert done.state == pb.JOB_STATE_SUCCEEDED, done
    assert (done.attempt, done.restarts) == (1, 0), "the outage restarted the job"
    # The watcher's stream broke while Redis was away, with UNAVAILABLE only, and it resumed after its cursor.
    assert broken and all(err.code() == grpc.StatusCode.UNAVAILABLE for err in broken), broken
    assert_state_store_unavailable(broken[0], own_redis)
    cursors = [e.cursor for e in events]
    assert len(set(cursors)) == len(cursors), "an event was delivered twice"
    everything = [e async for e in stub.WatchJob(pb.WatchJobRequest(id=job.id))]
    assert [e.cursor for e in everything] == cursors, "the resumed watcher missed events or got extra ones"
    steps = [e.step for e in events if e.type == pb.JOB_EVENT_TYPE_STEP]
    assert steps == list(range(REPORT_EVERY, STEPS_PER_EPOCH * EPOCHS + 1, REPORT_EVERY)), "steps lost or repeated"
    states = [e.state for e in events if e.type == pb.JOB_EVENT_TYPE_STATE]
    assert states[-2:] == [pb.JOB_STATE_FINALIZING, pb.JOB_STATE_SUCCEEDED]
    stored, newest = await job_as_stored(own_redis.url, prefix, job.id)
    assert stored.state.value == newest["state"] == "SUCCEEDED" and stored.step == STEPS_PER_EPOCH * EPOCHS


async def test_a_job_scheduled_while_redis_is_down_starts_when_it_is_back(trainer, own_redis, agents, digits_spec):
    """The scheduler's writes wait out the outage: a job whose slots free up meanwhile is neither lost in an
    unsaved state nor failed, and runs once Redis answers."""
    stub, _ = trainer
    spec = digits_spec(workers=3, report_every_steps=5)
    spec.hyper_parameters.epochs = 1
    spec.recipe = "file:fake.py"
    spec.recipe_params.update({"steps_per_epoch": 10})
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec, request_id=uuid.uuid4().hex))
    assert (await stub.GetJob(pb.GetJobRequest(id=job.id))).state == pb.JOB_STATE_PENDING  # two slots of three

    own_redis.kill()
    await agents(slots=1)  # the third slot: the scheduler places the job while Redis is away
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(own_redis.start)

    deadline = time.monotonic() + 60
    while (done := await stub.GetJob(pb.GetJobRequest(id=job.id))).state not in FINAL:
        assert time.monotonic() < deadline, f"the job never ran after Redis came back: {done}"
        await asyncio.sleep(0.1)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done
    assert (done.attempt, done.restarts) == (1, 0)
