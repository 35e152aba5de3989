"""Jobs in Redis: one JSON document per job, an index by submit time, client request ids, and a Redis Stream of
events per job. A state change and its event are written in one MULTI, so a watcher never sees one without
the other.

Every write is fenced: it carries the writing leader's epoch (kit.leader) and a Lua script refuses it when a newer
leader has claimed the store, so a trainer that lost its leadership cannot change a job after another took over.

Keys (after the prefix): job:{id}, jobs (sorted set by submit time), requests (hash request id -> job id),
job:{id}:events (stream), epoch (the newest leader's epoch).
"""

import asyncio
import dataclasses
import json
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from modelgrid.client.convert import parse_number
from modelgrid.client.errors import NotFound
from services.kit.leader import FencedOut
from services.kit.redis_client import ReplicaNotAcknowledged, guarded_pipeline, is_outage
from services.kit.streams import Backoff
from services.trainer.domain import FINAL, EventType, Failure, Job, JobEvent, JobState

logger = logging.getLogger(__name__)


# KEYS[1] epoch; ARGV[1] the writer's epoch. A script returns 0 when the writer is fenced out.
# A write of the newest leader also stores its epoch again, should a Redis fail-over have lost the claim.
_FENCE = """
local newest = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < newest then return 0 end
if tonumber(ARGV[1]) > newest then redis.call('SET', KEYS[1], ARGV[1]) end
"""
_CLAIM = _FENCE + "return 1"
# KEYS[2] job, KEYS[3] events; ARGV[2] the job's JSON, ARGV[3] an event's JSON or "".
_SAVE = (
    _FENCE
    + """
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('XADD', KEYS[3], '*', 'event', ARGV[3]) end
return 1
"""
)
# KEYS[2] job, KEYS[3] events, KEYS[4] jobs, KEYS[5] requests; ARGV[2] job JSON, ARGV[3] event JSON, ARGV[4] job id,
# ARGV[5] created_at, ARGV[6] request id or "". Returns the earlier job's id for a request id seen before.
_CREATE = (
    _FENCE
    + """
if ARGV[6] ~= '' then
  local earlier = redis.call('HGET', KEYS[5], ARGV[6])
  if earlier then return earlier end
  redis.call('HSET', KEYS[5], ARGV[6], ARGV[4])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'event', ARGV[3])
return 1
"""
)


class JobStore:
    """Reads and writes jobs and their events; writes carry `epoch`, set by the leader that claimed the store."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "mg:trainer:") -> None:
        self._redis = redis
        self._prefix = prefix
        self.epoch = 0
        self._claim = redis.register_script(_CLAIM)
        self._save = redis.register_script(_SAVE)
        self._create = redis.register_script(_CREATE)

    @property
    def _epoch_key(self) -> str:
        return f"{self._prefix}epoch"

    async def claim(self, epoch: int) -> None:
        """Makes `epoch` the store's newest: from now on writes of earlier leaders are refused. FencedOut when a
        newer one claimed it already."""
        if not await self._guarded(self._claim, [self._epoch_key], [epoch]):
            newest = await self._redis.get(self._epoch_key)
            raise FencedOut(
                f"leader epoch {epoch} is older than the job store's {newest}: another trainer leads now. (If "
                f"Consul's data was reset, its indexes start over: delete the Redis key {self._epoch_key} and "
                "restart the worker agents, which remember the newest epoch too.)"
            )
        self.epoch = epoch

    def _fenced(self, written: object) -> None:
        if not written:
            raise FencedOut(f"a newer leader than epoch {self.epoch} claimed the job store")

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}:events"

    async def create(self, job: Job, event: JobEvent) -> tuple[Job, bool]:
        """Stores a new job; with a request id seen before, returns the job it created and False."""
        job.created_at = job.updated_at = time.time()
        keys = [
            self._epoch_key,
            self._job_key(job.id),
            self._events_key(job.id),
            f"{self._prefix}jobs",
            f"{self._prefix}requests",
        ]
        args = [self.epoch, job.to_json(), _event_json(event), job.id, job.created_at, job.request_id]
        written = await self._guarded(self._create, keys, args)
        self._fenced(written)
        if written != 1:
            return await self.get(str(written)), False
        return job, True

    async def save(self, job: Job, event: JobEvent | None = None) -> None:
        """Writes the job (and appends an event) atomically; FencedOut when a newer leader claimed the store."""
        job.updated_at = time.time()
        keys = [self._epoch_key, self._job_key(job.id), self._events_key(job.id)]
        args = [self.epoch, job.to_json(), _event_json(event) if event else ""]
        if event is not None and event.type == EventType.STATE:  # a state change must survive a fail-over
            written = await self._guarded(self._save, keys, args)
        else:  # progress (steps, epochs, checkpoints) is written often and told again by the next one
            written = await self._save(keys=keys, args=args)
        self._fenced(written)

    async def _guarded(self, script, keys: list, args: list) -> object:
        """Runs a write script so that it waits for the replicas the settings ask for (kit.redis_client WAIT)."""
        async with guarded_pipeline(self._redis, transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            return (await pipe.execute())[0]

    async def save_patiently(self, job: Job, event: JobEvent | None = None) -> None:
        """`save`, waiting out a Redis outage (a restart, an AOF replay) with backoff instead of failing: for the
        trainer's own writes (a running job's progress, scheduling), which have no caller to answer UNAVAILABLE
        to. The workers train on meanwhile, and the job goes on where it was when Redis answers again."""
        backoff, failing_since = Backoff(initial=0.5, maximum=5.0), 0.0
        while True:
            try:
                await self.save(job, event)
                break
            except ReplicaNotAcknowledged as exc:  # written on the primary: go on (the next state change WAITs again)
                logger.warning("job %s: %s", job.id, exc)
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


def _event_json(event: JobEvent) -> str:
    data = dataclasses.asdict(event)
    data.pop("cursor")
    return json.dumps(data)
