"""Fenced writes of the job store on a real Redis: once a newer leader claimed the store, an older leader's writes
are refused (FencedOut) and change nothing, whatever it tries."""

import time
import uuid

import pytest

from services.kit.redis_client import create_redis
from services.trainer.domain import EventType, Job, JobEvent, JobState
from services.trainer.jobspec import JobSpec
from services.trainer.store import FencedOut, JobStore


def _event(state: JobState, message: str) -> JobEvent:
    return JobEvent(EventType.STATE, state, 0, time.time(), message=message)


async def test_a_deposed_leaders_writes_are_refused_and_change_nothing(redis_server):
    redis = create_redis(redis_server.url)
    prefix = f"mg:test-fencing-{uuid.uuid4().hex[:8]}:"
    try:
        old, new = JobStore(redis, prefix), JobStore(redis, prefix)
        await old.claim(40)
        job, created = await old.create(
            Job(id="j1", spec=JobSpec(workers=1), request_id="r1"), _event(JobState.PENDING, "submitted")
        )
        assert created
        again, created = await old.create(
            Job(id="j2", spec=JobSpec(workers=1), request_id="r1"), _event(JobState.PENDING, "submitted")
        )
        assert not created and again.id == "j1", "a request id seen before gives the job it made"

        await new.claim(45)  # a standby took over
        job.move(JobState.SCHEDULING)
        with pytest.raises(FencedOut):
            await old.save(job, _event(JobState.SCHEDULING, "late write"))
        with pytest.raises(FencedOut):
            await old.create(Job(id="j3", spec=JobSpec(workers=1)), _event(JobState.PENDING, "late submit"))
        with pytest.raises(FencedOut):
            await old.claim(44)

        stored = await new.get("j1")
        assert stored.state == JobState.PENDING, "the refused write changed the job"
        assert [e.message for e in await new.events("j1", "0", block_ms=0)] == ["submitted"]
        with pytest.raises(Exception, match="no job"):
            await new.get("j3")
        stored.move(JobState.SCHEDULING)
        await new.save(stored, _event(JobState.SCHEDULING, "the new leader's write"))
        assert (await old.get("j1")).state == JobState.SCHEDULING
        await new.claim(45)  # claiming its own epoch again (a restarted core of the same term) is allowed
    finally:
        await redis.aclose()
