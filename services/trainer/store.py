"""Jobs in Redis: one JSON document per job, an index by submit time, client request ids, and a Redis Stream of
events per job. A state change and its event are written in one MULTI, so a watcher never sees one without
the other.

Keys (after the prefix): job:{id}, jobs (sorted set by submit time), requests (hash request id -> job id),
job:{id}:events (stream).
"""

import asyncio
import dataclasses
import json
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from modelgrid.client.convert import parse_number
from modelgrid.client.errors import NotFound
from services.kit.redis_client import is_outage
from services.kit.streams import Backoff
from services.trainer.domain import FINAL, EventType, Failure, Job, JobEvent, JobState

logger = logging.getLogger(__name__)


class JobStore:
    """Reads and writes jobs and their events."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "mg:trainer:") -> None:
        self._redis = redis
        self._prefix = prefix

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}:events"

    async def create(self, job: Job, event: JobEvent) -> tuple[Job, bool]:
        """Stores a new job; with a request id seen before, returns the job it created and False."""
        requests_key = f"{self._prefix}requests"
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(requests_key)
                    if job.request_id and (earlier := await pipe.hget(requests_key, job.request_id)):
                        await pipe.reset()
                        return await self.get(earlier), False
                    job.created_at = job.updated_at = time.time()
                    pipe.multi()
                    if job.request_id:
                        pipe.hset(requests_key, job.request_id, job.id)
                    pipe.set(self._job_key(job.id), job.to_json())
                    pipe.zadd(f"{self._prefix}jobs", {job.id: job.created_at})
                    self._queue_event(pipe, job.id, event)
                    await pipe.execute()
                    return job, True
                except WatchError:
                    continue

    async def save(self, job: Job, event: JobEvent | None = None) -> None:
        """Writes the job (and appends an event) atomically."""
        job.updated_at = time.time()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._job_key(job.id), job.to_json())
            if event is not None:
                self._queue_event(pipe, job.id, event)
            await pipe.execute()

    async def save_patiently(self, job: Job, event: JobEvent | None = None) -> None:
        """`save`, waiting out a Redis outage (a restart, an AOF replay) with backoff instead of failing: for the
        trainer's own writes (a running job's progress, scheduling), which have no caller to answer UNAVAILABLE
        to. The workers train on meanwhile, and the job goes on where it was when Redis answers again."""
        backoff, failing_since = Backoff(initial=0.5, maximum=5.0), 0.0
        while True:
            try:
                await self.save(job, event)
                break
            except RedisError as exc:
                if not is_outage(exc):
                    raise
                failing_since = failing_since or time.monotonic()
                delay = backoff.next()
                logger.warning("job %s: Redis is unavailable (%s); saving again in %.1fs", job.id, exc, delay)
                await asyncio.sleep(delay)
        if failing_since:
            logger.info("job %s: saved again after %.1fs without Redis", job.id, time.monotonic() - failing_since)

    def _queue_event(self, pipe, job_id: str, event: JobEvent) -> None:
        data = dataclasses.asdict(event)
        data.pop("cursor")
        pipe.xadd(self._events_key(job_id), {"event": json.dumps(data)})

    async def get(self, job_id: str) -> Job:
        raw = await self._redis.get(self._job_key(job_id)) if job_id else None
        if raw is None:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_json(raw)

    async def list_jobs(self, state: JobState | None, page_size: int, page_token: str) -> tuple[list[Job], str]:
        """Jobs newest first; the token is the offset to continue at."""
        offset, size = parse_number(page_token, "page_token") if page_token else 0, page_size
        jobs: list[Job] = []
        ids = await self._redis.zrevrange(f"{self._prefix}jobs", 0, -1)
        position = offset
        for job_id in ids[offset:]:
            position += 1
            job = await self.get(job_id)
            if state is None or job.state == state:
                jobs.append(job)
                if len(jobs) == size:
                    return jobs, str(position) if position < len(ids) else ""
        return jobs, ""

    async def unfinished(self) -> list[Job]:
        """Every job not in a final state, oldest first."""
        jobs = [await self.get(job_id) for job_id in await self._redis.zrange(f"{self._prefix}jobs", 0, -1)]
        return [job for job in jobs if job.state not in FINAL]

    async def events(self, job_id: str, after: str, block_ms: int, count: int = 200) -> list[JobEvent]:
        """Events after the cursor `after` ("0": from the first), waiting up to block_ms for one."""
        reply = await self._redis.xread({self._events_key(job_id): after}, count=count, block=block_ms)
        if not reply:
            return []
        events = []
        for cursor, fields in reply[0][1]:
            data = json.loads(fields["event"])
            data["type"], data["state"] = EventType(data["type"]), JobState(data["state"])
            data["failure"] = Failure(**data["failure"]) if data["failure"] else None
            events.append(JobEvent(**data, cursor=cursor))
        return events
