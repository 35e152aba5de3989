"""The trainer's transport-free core: accept jobs, schedule them onto agents (gang scheduling, spread), run each
with a JobRunner, and answer queries. Jobs live in Redis, so a restarted trainer reloads them and re-attaches to
workers that kept running: nothing is lost and nothing runs twice.

Several trainers may run; one leads (kit.leader, elected in Consul) and only it schedules, runs jobs and accepts
writes. The others are standbys: they answer reads from Redis and refuse writes with UNAVAILABLE. `start(epoch)`
takes the lead, `stop()` gives it up; every write carries the epoch (trainer.store), so does every call that starts
or stops workers (the agents keep the newest epoch), and one refused as fenced out makes the leader step down
(`on_fenced`)."""

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from modelgrid.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelgridError,
    NotFound,
    Unavailable,
)
from modelgrid.client.registry import AsyncRegistryClient, Lineage
from services.clients.agent import AgentClient, Export
from services.kit.leader import Fence
from services.kit.redis_client import ReplicaNotAcknowledged
from services.trainer import VERSION
from services.trainer.domain import FINAL, HOLDS_SLOTS, EventType, Job, JobEvent, JobState, Placement, WorkerView
from services.trainer.jobspec import JobSpec
from services.trainer.placement import place
from services.trainer.registry_recipes import cached_recipe, fetch_recipe, is_registry_recipe
from services.trainer.runner import JobRunner
from services.trainer.settings import TrainerSettings
from services.trainer.specs import check_shape, locate_dataset
from services.trainer.store import FencedOut, JobStore

logger = logging.getLogger(__name__)
RECIPE_FETCH_SECONDS = 20.0
"""Bound on fetching a registry recipe before a job starts (the scheduler waits for it; the job stays PENDING)."""


class TrainerCore:
    """Jobs, scheduling, runners and registration."""

    def __init__(
        self, store: JobStore, agents: AgentClient, registry: AsyncRegistryClient, settings: TrainerSettings
    ) -> None:
        self._store = store
        self._agents = agents
        self._leader_agents = agents.fenced(Fence(settings.leader_key, 0))
        """The agents as this trainer's current term calls them: with its fence (the scheduler and the runners)."""
        self._registry = registry
        self._settings = settings
        self.jobs: dict[str, Job] = {}
        self._runners: dict[str, tuple[JobRunner, asyncio.Task]] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._submit_lock = asyncio.Lock()
        self.leading = False
        self._led = asyncio.Event()  # set while leading
        self.on_fenced: Callable[[], None] = lambda: None
        """Called when a write was refused as fenced out (a newer leader exists): the election resigns."""
        self.leader_elsewhere: Callable[[], bool] = lambda: False
        """Whether the election saw another instance hold the lock (a write then is refused at once)."""
        agents.add_listener(self._wake.set)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, epoch: int) -> None:
        """Takes the lead with `epoch`: claims the job store (FencedOut when a newer leader did), reloads unfinished
        jobs, re-attaches to running ones, starts the scheduler."""
        await self._store.claim(epoch)  # before any agent hears the epoch: an agent refuses no term the store admits
        self._leader_agents = self._agents.fenced(Fence(self._settings.leader_key, epoch))
        self.jobs.clear()
        for job in await self._store.unfinished():
            self.jobs[job.id] = job
            if job.state == JobState.SCHEDULING:
                job.move(JobState.PENDING)  # placement was not finished: place it again
                await self._store.save(job)
            elif job.state != JobState.PENDING:
                logger.info("job %s was %s when the trainer stopped: re-attaching", job.id, job.state.value)
                await self._recipe_ready(job, report=False)  # a later attempt's worker spec needs it
                self._spawn(job, reattach=True)
        self.leading = True  # only now: a cancel before the runners are back would take the wrong branch
        self._led.set()
        self._scheduler = asyncio.create_task(self._schedule_forever(), name="scheduler")

    async def stop(self) -> None:
        """Gives up the lead: stops following jobs (their workers keep running for the next leader)."""
        self.leading = False
        self._led.clear()
        tasks = [t for _, t in self._runners.values()]
        if self._scheduler:
            tasks.append(self._scheduler)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scheduler = None
        self._runners.clear()
        self.jobs.clear()
        self._store.epoch = 0  # a late write of this term is refused even before another leader claims

    async def _require_leader(self) -> None:
        """Writes are the leader's. While no leader is known (a trainer starting, a take-over under way) a write
        waits up to leader_wait_seconds for this one to lead; with another leading it is refused at once."""
        if not self.leading and not self.leader_elsewhere():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.leader_wait_seconds):
                    await self._led.wait()
        if not self.leading:
            raise Unavailable(
                "this trainer is a standby (the leader is elected in Consul); retry: the gateway sends calls to "
                "the leader"
            )

    def _fenced_out(self, exc: FencedOut) -> Unavailable:
        """Steps down after a refused write; the caller's error."""
        logger.error("a write was refused (%s): another trainer leads now; stepping down", exc)
        was_leading, self.leading = self.leading, False
        self._led.clear()
        if was_leading:  # once per term: a resign reaching the election between terms would end the next one
            self.on_fenced()
        return Unavailable("this trainer just lost its leadership to another one; retry")

    # -- API ---------------------------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, request_id: str) -> Job:
        """Validates and queues a job; nothing is queued when the spec is invalid."""
        await self._require_leader()
        if len(request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters")
        check_shape(spec, self._settings)
        recipe_digest = ""
        if is_registry_recipe(spec.recipe):
            recipe = await fetch_recipe(spec.recipe, self._registry, self._settings)
            check_shape(spec, self._settings, registry_source=recipe.source)
            recipe_digest = recipe.digest
        digest = await locate_dataset(spec, self._settings, self._registry)
        job = Job(
            id=uuid.uuid4().hex[:12],
            spec=spec,
            request_id=request_id,
            dataset_digest=digest,
            recipe_digest=recipe_digest,
            message="waiting to be scheduled",
        )
        event = JobEvent(EventType.STATE, JobState.PENDING, 0, time.time(), message="submitted")
        async with self._submit_lock:
            if not self.leading:  # lost the lead while the recipe and the data set were checked
                raise Unavailable("this trainer lost its leadership while checking the job; retry")
            try:
                job, created = await self._store.create(job, event)
            except FencedOut as exc:
                raise self._fenced_out(exc) from exc
            except ReplicaNotAcknowledged:  # stored on the primary: schedule it; the caller hears it may be lost
                self.jobs.setdefault(job.id, job)
                self._wake.set()
                raise
            if created:
                self.jobs[job.id] = job
                logger.info("job %s submitted: %s x%d", job.id, spec.recipe, job.workers)
        self._wake.set()
        return self.jobs.get(job.id, job)

    async def get(self, job_id: str) -> Job:
        return self.jobs.get(job_id) or await self._store.get(job_id)

    async def list_jobs(self, state: JobState | None, page_size: int, page_token: str) -> tuple[list[Job], str]:
        if page_token and not page_token.isdigit():
            raise InvalidArgument(f"invalid page_token {page_token!r}")
        jobs, token = await self._store.list_jobs(state, min(page_size or 50, 500), page_token)
        return [self.jobs.get(j.id, j) for j in jobs], token

    async def cancel(self, job_id: str) -> Job:
        await self._require_leader()
        job = await self.get(job_id)
        if job.state in FINAL:
            raise FailedPrecondition(f"job {job_id} is already {job.state.value}")
        job.cancel_requested = True
        try:
            if job.id in self._runners:
                self._runners[job.id][0].cancel.set()
                await self._store.save(job)
            else:  # PENDING: nothing runs
                job.move(JobState.CANCELLED)
                job.message = "cancelled before it started"
                await self._store.save(job, _state_event(job))
                self.jobs.pop(job.id, None)
        except FencedOut as exc:
            raise self._fenced_out(exc) from exc
        return job

    async def watch(self, job_id: str, cursor: str) -> AsyncIterator[JobEvent]:
        """Every event after `cursor` ("": from the first); ends after the job's final event."""
        await self.get(job_id)
        if cursor and not _is_stream_id(cursor):
            raise InvalidArgument(f"invalid cursor {cursor!r}")
        cursor = cursor or "0"
        while True:
            for event in await self._store.events(job_id, cursor, block_ms=1000):
                cursor = event.cursor
                yield event
                if event.type == EventType.STATE and event.state in FINAL:
                    return

    async def logs(self, job_id: str, task_index: int, tail: int) -> list[tuple[int, str, list[str]]]:
        job = await self.get(job_id)
        out = []
        for placement in sorted(job.placements, key=lambda p: p.task_index):
            if task_index >= 0 and placement.task_index != task_index:
                continue
            try:
                lines = await self._agents.replica_logs(placement.agent, job.id, placement.task_index, tail or 200)
            except ModelgridError as exc:
                lines = [f"(logs unavailable: {exc})"]
            out.append((placement.task_index, placement.agent, lines))
        if task_index >= 0 and not out:
            raise NotFound(f"job {job_id} has no worker {task_index}")
        return out

    async def worker_views(self) -> list[WorkerView]:
        """The agents and what runs on them: a standby counts the unfinished jobs in Redis."""
        return self.workers(None if self.leading else await self._store.unfinished())

    def workers(self, jobs: list[Job] | None = None) -> list[WorkerView]:
        views = {a.id: WorkerView(a.id, a.host, a.address, a.slots) for a in self._agents.agents.values()}
        for job in self.jobs.values() if jobs is None else jobs:
            if job.state in HOLDS_SLOTS:
                for placement in job.placements:
                    if placement.agent in views:
                        views[placement.agent].used += 1
                        if job.id not in views[placement.agent].jobs:
                            views[placement.agent].jobs.append(job.id)
        return sorted(views.values(), key=lambda v: v.id)

    # -- scheduling --------------------------------------------------------------------------------------------

    async def _schedule_forever(self) -> None:
        while self.leading:  # a leader fenced out stops scheduling at once, before its election steps it down
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancel that arrives as the wait ends
            # (a runner setting _wake as the trainer stops), and the scheduler then never stops.
            try:
                async with asyncio.timeout(self._settings.schedule_interval_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._schedule_pending()
            except FencedOut as exc:
                self._fenced_out(exc)
                return
            except Exception:  # noqa: BLE001 - the scheduler must survive one bad round
                logger.exception("scheduling round failed")

    async def _schedule_pending(self) -> None:
        """Starts every pending job whose replicas all fit now, oldest first (a job that does not fit does not
        hold back smaller jobs behind it)."""
        pending = sorted((j for j in self.jobs.values() if j.state == JobState.PENDING), key=lambda j: j.created_at)
        for job in pending:
            if not await self._recipe_ready(job):
                continue
            free = {w.id: w.slots - w.used for w in self.workers()}
            agents = place(job.workers, free)
            if agents is None:
                message = f"waiting for {job.workers} free slots; {sum(max(f, 0) for f in free.values())} free"
                if job.message != message:
                    job.message = message
                    await self._store.save_patiently(job)
                continue
            job.move(JobState.SCHEDULING)
            job.message = f"placing on {sorted(set(agents))}"
            await self._store.save_patiently(job, _state_event(job))
            if await self._assign(job, agents):
                self._spawn(job, reattach=False)
            else:
                job.move(JobState.PENDING)
                await self._store.save_patiently(job)

    async def _assign(self, job: Job, agents: list[str]) -> bool:
        """Reserves ports on the chosen agents (the same ports for the job's whole life on an agent) and records
        the placements; False when an agent could not be reached."""
        placements = []
        per_agent: dict[str, list[int]] = {}
        for task, agent in enumerate(agents):
            per_agent.setdefault(agent, []).append(task)
        for agent, tasks in per_agent.items():
            try:
                ports = await self._leader_agents.reserve_ports(agent, job.id, len(tasks))
                host = self._agents.agents[agent].host
            except (ModelgridError, KeyError) as exc:
                logger.warning("reserving ports on %s for job %s failed: %s", agent, job.id, exc)
                return False
            placements += [Placement(t, agent, f"{host}:{port}") for t, port in zip(tasks, ports, strict=True)]
        job.placements = sorted(placements, key=lambda p: p.task_index)
        await self._store.save_patiently(job)
        return True

    async def _replace(self, job: Job) -> bool:
        """New agents for a job that lost one; False (job back to PENDING) when it does not fit now."""
        lost = {p.agent for p in job.placements} - set(self._agents.agents)
        free = {w.id: w.slots - w.used for w in self.workers()}
        for placement in job.placements:  # its own surviving slots count as free for it
            if placement.agent in free:
                free[placement.agent] += 1
        agents = place(job.workers, {a: f for a, f in free.items() if a not in lost})
        if agents is not None and await self._assign(job, agents):
            return True
        job.move(JobState.PENDING)
        job.message = "lost an agent; waiting for free slots"
        await self._store.save_patiently(job, _state_event(job))
        self._runners.pop(job.id, None)
        self._wake.set()
        return False

    async def _recipe_ready(self, job: Job, report: bool = True) -> bool:
        """Whether the job can start as far as its recipe goes: a registry recipe's verified source must be in this
        trainer's scratch (fetched again when this trainer is not the one that took the job). While the registry
        cannot be reached the job waits, PENDING; a recipe the registry no longer has (or that changed) fails the
        attempt as an invalid spec when it builds its worker spec. `report`: say so in the job's message."""
        if not job.recipe_digest:
            return True
        try:
            cached_recipe(job.spec.recipe, job.recipe_digest, self._settings)
            return True
        except InvalidArgument:
            pass
        try:
            async with asyncio.timeout(RECIPE_FETCH_SECONDS):
                recipe = await fetch_recipe(job.spec.recipe, self._registry, self._settings)
        except (Unavailable, DeadlineExceeded, TimeoutError) as exc:
            message = f"waiting for the registry to fetch recipe {job.spec.recipe}: {exc or 'timed out'}"
            logger.warning("job %s: %s", job.id, message)
            if report and job.message != message:
                job.message = message
                await self._store.save_patiently(job)
            return False
        except ModelgridError as exc:
            logger.warning("job %s: fetching recipe %s failed: %s", job.id, job.spec.recipe, exc)
            return True
        if recipe.digest != job.recipe_digest:
            logger.warning("job %s: recipe %s changed its digest since the submit", job.id, job.spec.recipe)
        return True

    def _spawn(self, job: Job, reattach: bool) -> None:
        runner = JobRunner(job, self._store, self._leader_agents, self._settings, self.register, self._replace)
        if job.cancel_requested:
            runner.cancel.set()
        task = asyncio.create_task(self._run(runner, reattach), name=f"job-{job.id}")
        self._runners[job.id] = (runner, task)

    async def _run(self, runner: JobRunner, reattach: bool) -> None:
        job = runner.job
        try:
            await runner.run(reattach=reattach)
        except asyncio.CancelledError:
            raise
        except FencedOut as exc:  # the job is the new leader's now: leave it as it is
            self._fenced_out(exc)
        except Exception:  # noqa: BLE001 - a broken runner fails its job, never the trainer
            logger.exception("job %s: runner failed", job.id)
            job.failure.reason = job.failure.reason or "internal error in the trainer"
            if job.state not in FINAL:
                job.state = JobState.FAILED
                try:
                    await self._store.save_patiently(job, _state_event(job, "internal error in the trainer"))
                except FencedOut as exc:
                    self._fenced_out(exc)
        finally:
            if self._runners.get(job.id, (None,))[0] is runner:
                self._runners.pop(job.id, None)
            if job.state in FINAL:
                self.jobs.pop(job.id, None)
            self._wake.set()

    # -- registration ------------------------------------------------------------------------------------------

    async def register(self, job: Job, export: Export, metrics: dict[str, float]) -> int:
        """Creates a finished job's model version from the SavedModel blob its chief's agent uploaded (no bytes
        move), with its metrics, parameters and lineage, and points its aliases at it; returns the version number.
        A trainer that registers the same job again (after a restart) gets the same version."""
        spec, name = job.spec, job.spec.register_model
        params = {k: str(v) for k, v in dataclasses.asdict(spec.hyper_parameters).items() if v}
        params.update(recipe=spec.recipe, workers=str(job.workers), recipe_params=str(spec.recipe_params or None))
        recipe = f"recipe {spec.recipe}"
        if job.recipe_digest:
            params["recipe_digest"] = job.recipe_digest
            recipe += f" sha256:{job.recipe_digest}"
        await self._registry.ensure_model(name)
        version = await self._registry.create_version_from_blob(
            name,
            export.digest,
            request_id=f"trainer-job-{job.id}",
            description=f"trained by job {job.id} ({spec.name or spec.recipe})",
            metrics=metrics,
            params=params,
            lineage=Lineage(
                training_job_id=job.id,
                dataset_digest=job.dataset_digest,
                source=f"modelgrid-trainer {VERSION}, {recipe}",
            ),
        )
        for alias in spec.register_aliases:
            await self._registry.set_alias(name, alias, version.version)
        return version.version


def _state_event(job: Job, message: str = "") -> JobEvent:
    """The event of a job's move to its current state."""
    return JobEvent(EventType.STATE, job.state, job.attempt, time.time(), message=message or job.message)


def _is_stream_id(text: str) -> bool:
    ms, sep, seq = text.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()
