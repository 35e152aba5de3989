"""Runs one training job on its placed agents: start the group, follow it, restart it from the last checkpoint
when a worker fails, hangs or is lost, and finish by registering the model.

MultiWorkerMirroredStrategy cannot go on short-handed: when any worker dies the others die too, of
UnavailableError, seconds later. So the first worker to exit non-zero is the root cause, the rest of the group
is killed at once, and the whole group starts again on the same host:port list (or on new agents, when one was
lost); the workers resume from the checkpoint (BackupAndRestore) at the step it holds. Exit 42 is a preemption: it
does not spend the restart budget. Exit 2 is an unusable spec or data set: restarting cannot help, the job fails
at once.

No file crosses a host: the chief's agent uploads the checkpoints the chief saves (every `upload_checkpoint_every`)
to the registry and reports each on the chief's replica; the newest is recorded in the job, and every replica of
the next attempt gets it (ReplicaData.restore) for its agent to unpack before the worker starts. The agent uploads
the chief's SavedModel the same way, and the model version is created from that blob.
"""

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from modelgrid.client.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    ModelgridError,
    ResourceExhausted,
    Unavailable,
)
from services.clients.agent import AgentClient
from services.clients.agent.types import Export, ReplicaEvent, ReplicaKey, ReplicaState, ReplicaStatus
from services.kit.streams import Backoff, cancelling
from services.trainer.domain import EventType, Failure, Job, JobCheckpoint, JobEvent, JobState
from services.trainer.exit_codes import ExitCode, describe_exit
from services.trainer.progress import Epoch, Exported, Preempted, ProgressEvent, Started, Step
from services.trainer.settings import TrainerSettings
from services.trainer.specs import replica_data, worker_spec
from services.trainer.store import JobStore

logger = logging.getLogger(__name__)

CHIEF = 0


class OutcomeKind(enum.StrEnum):
    """How an attempt ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """A worker exited non-zero: restart the group, spending the budget."""
    PREEMPTED = "preempted"
    """A worker was preempted (exit 42): restart without spending the budget."""
    INVALID = "invalid"
    """The spec or data set is unusable (exit 2): fail the job."""
    HANG = "hang"
    LOST = "lost"
    """An agent turned critical or is gone: place the job again."""
    BLOCKED = "blocked"
    """An earlier worker still holds a slot: wait, without spending the budget."""
    CANCELLED = "cancelled"


@dataclass
class Outcome:
    """How an attempt ended, and the first failure behind it."""

    kind: OutcomeKind
    failure: Failure | None = None


Register = Callable[[Job, Export, dict[str, float]], Awaitable[int]]
"""Creates the model version from the SavedModel blob the chief's agent uploaded; returns the version number."""


class JobRunner:
    """Drives one job to a final state. Cancelled (trainer shutdown) it leaves the job as it is, so that the
    next trainer re-attaches to the workers that keep running."""

    def __init__(
        self,
        job: Job,
        store: JobStore,
        agents: AgentClient,
        settings: TrainerSettings,
        register: Register,
        replace: Callable[[Job], Awaitable[bool]],
    ) -> None:
        self.job = job
        self._store = store
        self._agents = agents
        self._settings = settings
        self._register = register
        self._replace = replace  # finds new agents for a job that lost one; False: it must wait (PENDING)
        self.cancel = asyncio.Event()
        self._preempted_step = 0
        self._resume_step = 0
        self._started_at = time.monotonic()
        self._last_progress = time.monotonic()
        self._export: Export | None = None
        """The SavedModel blob the chief's agent uploaded (the current attempt's)."""
        self._export_metrics: dict[str, float] | None = None
        self._upload_error = ""

    # -- the loop ----------------------------------------------------------------------------------------------

    async def run(self, reattach: bool = False) -> None:
        job = self.job
        outcome = await self._reattach() if reattach else None
        backoff = self._settings.restart_backoff_seconds
        while True:
            if outcome is None:
                if self.cancel.is_set():
                    outcome = Outcome(OutcomeKind.CANCELLED)
                else:
                    outcome = await self._start_attempt() or await self._follow()
            if outcome.kind == OutcomeKind.SUCCEEDED:
                await self._finalize()
                return
            if outcome.kind == OutcomeKind.CANCELLED:
                await self._transition(JobState.CANCELLING, EventType.STATE, "cancelling on request")
                await self._stop_group(kill=True)
                await self._end(JobState.CANCELLED, "cancelled on request")
                return
            await self._stop_group(kill=True)
            job.failure = outcome.failure or Failure(reason=str(outcome.kind))
            if outcome.kind == OutcomeKind.INVALID:
                await self._end(JobState.FAILED, f"unusable job: {job.failure.reason}")
                return
            if outcome.kind == OutcomeKind.PREEMPTED:
                job.preemptions += 1
            elif outcome.kind in (OutcomeKind.BLOCKED, OutcomeKind.LOST):
                pass  # a slot still held, or a host lost (its agent critical in Consul): not the job's fault
            elif job.restarts >= self._max_restarts:
                spent = f"restart budget of {self._max_restarts} spent; last cause: {job.failure.reason}"
                await self._end(JobState.FAILED, spent)
                return
            else:
                job.restarts += 1
            job.failed_at = job.failed_at or time.time()
            preempted = outcome.kind == OutcomeKind.PREEMPTED
            uncounted = {
                OutcomeKind.PREEMPTED: " (preemption, not counted)",
                OutcomeKind.LOST: " (lost host, not counted)",
            }
            await self._transition(
                JobState.RESTARTING,
                EventType.RESTART,
                f"{outcome.kind}: {job.failure.reason}; restart {job.restarts}/{self._max_restarts}"
                f"{uncounted.get(outcome.kind, '')}",
                failure=job.failure,
                step=self._preempted_step if preempted and self._preempted_step else job.step,
            )
            self._preempted_step = 0
            if outcome.kind == OutcomeKind.LOST and not await self._replace(job):
                return  # back to PENDING: the scheduler starts it again when slots free up
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            outcome = None

    @property
    def _max_restarts(self) -> int:
        value = self.job.spec.max_restarts
        return self._settings.default_max_restarts if value is None else value

    # -- one attempt -------------------------------------------------------------------------------------------

    def _tf_config(self, task_index: int) -> str:
        cluster = {"worker": [p.address for p in sorted(self.job.placements, key=lambda p: p.task_index)]}
        return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": task_index}})

    async def _start_attempt(self) -> Outcome | None:
        job = self.job
        job.attempt += 1
        agents = sorted({p.agent for p in job.placements})
        await self._transition(JobState.STARTING, EventType.STATE, f"starting attempt {job.attempt} on {agents}")
        self._started_at = time.monotonic()
        self._export, self._export_metrics, self._upload_error = None, None, ""
        self._resume_step = job.checkpoint.step if job.checkpoint is not None else 0  # until the chief says
        try:
            spec = worker_spec(job, self._settings)
        except InvalidArgument as exc:  # a file recipe that went away since the submit
            return Outcome(OutcomeKind.INVALID, Failure(reason=str(exc)))
        data = replica_data(job)
        if data.restore is not None:
            logger.info("job %s attempt %d resumes from checkpoint %s", job.id, job.attempt, job.checkpoint)
        for placement in job.placements:
            key = ReplicaKey(job.id, job.attempt, placement.task_index)
            tf_config = self._tf_config(placement.task_index)
            try:
                await self._agents.start_replica(placement.agent, key, tf_config, spec, data)
            except ModelgridError as exc:
                reason = f"could not start worker {placement.task_index} on {placement.agent}: {exc}"
                logger.warning("job %s: %s", job.id, reason)
                if placement.agent not in self._agents.agents:
                    kind = OutcomeKind.LOST
                elif isinstance(exc, ResourceExhausted):
                    kind = OutcomeKind.BLOCKED  # an earlier worker still holds the slot
                else:
                    kind = OutcomeKind.FAILED
                return Outcome(kind, Failure(placement.task_index, placement.agent, reason=reason))
        return None

    async def _reattach(self) -> Outcome | None:
        """After a trainer restart: follow the current attempt's workers if any still exist on the agents."""
        job = self.job
        if job.attempt == 0 or not job.placements:
            return None
        known = 0
        for agent in {p.agent for p in job.placements}:
            try:
                replicas = await self._agents.list_replicas(agent, job.id)
            except ModelgridError:
                return Outcome(OutcomeKind.LOST, Failure(agent=agent, reason=f"agent {agent} is gone"))
            known += sum(1 for r in replicas if r.key.attempt == job.attempt)
        if known == 0:
            return None
        logger.info("job %s: re-attached to attempt %d", job.id, job.attempt)
        job.failed_at = 0.0  # the step it resumed at is not known here: no RESUMED event for this attempt
        self._started_at = time.monotonic()
        return await self._follow()

    async def _follow(self) -> Outcome:
        """Merges the agents' replica streams for this attempt until the attempt has an outcome."""
        job = self.job
        events: asyncio.Queue = asyncio.Queue()
        agents = sorted({p.agent for p in job.placements})
        readers = [asyncio.create_task(self._read_agent(agent, events)) for agent in agents]
        ticker = asyncio.create_task(self._tick(events))
        started: set[int] = set()
        exited: dict[int, int] = {}
        self._last_progress = time.monotonic()
        try:
            while True:
                kind, agent, payload = await events.get()
                if kind == "tick":
                    outcome = self._check_health(agents)
                elif kind == "lost":
                    failure = Failure(agent=agent, reason=f"agent {agent} was lost ({payload})")
                    outcome = Outcome(OutcomeKind.LOST, failure)
                else:
                    outcome = await self._on_replica_event(agent, payload, started, exited)
                if outcome is not None:
                    return outcome
        finally:
            for task in [*readers, ticker]:
                task.cancel()
            await asyncio.gather(*readers, ticker, return_exceptions=True)

    async def _read_agent(self, agent: str, events: asyncio.Queue) -> None:
        """Forwards one agent's events; reconnects while the agent is healthy, reports it lost otherwise."""
        while True:
            try:
                async for event in self._agents.watch_replicas(agent, self.job.id):
                    await events.put(("replica", agent, event))
            except (ModelgridError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and cancelling():
                    raise  # the attempt is over; otherwise the agent's channel was closed under the stream
                if agent not in self._agents.agents:
                    await events.put(("lost", agent, str(exc) or "its channel closed"))
                    return
            await asyncio.sleep(0.5)

    async def _tick(self, events: asyncio.Queue) -> None:
        while True:
            await asyncio.sleep(0.5)
            await events.put(("tick", "", None))

    def _check_health(self, agents: list[str]) -> Outcome | None:
        if self.cancel.is_set():
            return Outcome(OutcomeKind.CANCELLED)
        healthy = self._agents.agents
        for agent in agents:
            if agent not in healthy:
                failure = Failure(agent=agent, reason=f"agent {agent} turned critical in Consul")
                return Outcome(OutcomeKind.LOST, failure)
        now = time.monotonic()
        start_timeout = self._settings.start_timeout_seconds
        if self.job.state == JobState.STARTING and now - self._started_at > start_timeout:
            return Outcome(OutcomeKind.HANG, Failure(reason=f"workers did not start within {start_timeout:.0f}s"))
        limit = self.job.spec.hang_timeout_seconds or self._settings.hang_timeout_seconds
        if self.job.state == JobState.RUNNING and now - self._last_progress > limit:
            return Outcome(OutcomeKind.HANG, Failure(reason=f"no step progress for {limit:.0f}s"))
        return None

    async def _on_replica_event(
        self, agent: str, event: ReplicaEvent, started: set[int], exited: dict[int, int]
    ) -> Outcome | None:
        job, replica = self.job, event.replica
        if replica.key.attempt != job.attempt:
            return None  # a late word from an earlier attempt
        await self._note_uploads(replica)
        task = replica.key.task_index
        if event.progress:
            try:
                progress = ProgressEvent.from_json(event.progress)
            except ValueError as exc:
                logger.warning("job %s worker %d: skipping a progress line: %s", job.id, task, exc)
                return None
            await self._on_progress(task, progress, started)
            return None
        if replica.state != ReplicaState.EXITED or task in exited:
            return None
        exited[task] = replica.exit_code
        if replica.exit_code == ExitCode.OK:
            if len(exited) == job.workers and all(code == ExitCode.OK for code in exited.values()):
                return Outcome(OutcomeKind.SUCCEEDED)
            return None
        reason = f"worker {task} on {agent} exited with {describe_exit(replica.exit_code)}"
        if replica.error:
            reason += f" ({replica.error})"
        failure = Failure(task, agent, replica.exit_code, reason)
        job.failed_at = time.time()
        logger.warning("job %s attempt %d: %s", job.id, job.attempt, failure.reason)
        if replica.exit_code == ExitCode.PREEMPTED:
            return Outcome(OutcomeKind.PREEMPTED, failure)
        if replica.exit_code == ExitCode.INVALID_SPEC:
            return Outcome(OutcomeKind.INVALID, failure)
        return Outcome(OutcomeKind.FAILED, failure)

    async def _on_progress(self, task: int, progress: ProgressEvent, started: set[int]) -> None:
        job = self.job
        self._last_progress = time.monotonic()
        match progress:
            case Started():
                started.add(task)
                if task == CHIEF:
                    self._resume_step = progress.initial_step
                if len(started) == job.workers and job.state == JobState.STARTING:
                    message = f"attempt {job.attempt}: all {job.workers} workers training"
                    await self._transition(JobState.RUNNING, EventType.STATE, message)
            case Preempted(step=int(step)):
                self._preempted_step = step
        if task != CHIEF:
            return
        match progress:
            case Step():
                job.step, job.epoch = progress.step, progress.epoch or job.epoch
                job.metrics.update(_only(progress.metrics, training=True))
                if job.state == JobState.STARTING:
                    await self._transition(JobState.RUNNING, EventType.STATE, f"attempt {job.attempt}: training")
                if job.failed_at:  # the first step after a restart (of this runner's, or before it)
                    recovery = time.time() - job.failed_at
                    job.failed_at = 0.0
                    message = f"training again at step {self._resume_step} after {recovery:.1f}s"
                    resumed = self._event(EventType.RESUMED, message, step=self._resume_step, recovery_seconds=recovery)
                    await self._save(resumed)
                step = self._event(EventType.STEP, "", step=job.step, epoch=job.epoch, metrics=dict(job.metrics))
                await self._save(step)
            case Epoch():
                job.epoch = progress.epoch
                job.metrics.update(_only(progress.metrics))
                message = f"epoch {job.epoch} done"
                epoch = self._event(EventType.EPOCH, message, step=job.step, epoch=job.epoch, metrics=dict(job.metrics))
                await self._save(epoch)
            case Exported():
                self._export_metrics = dict(progress.metrics)  # its path is the chief's host's: the agent uploads it

    async def _note_uploads(self, replica: ReplicaStatus) -> None:
        """Takes in what the chief's agent uploaded: the newest checkpoint goes into the job (saved: a group
        restarted on any host resumes from it), the SavedModel is kept for registration."""
        job = self.job
        if replica.key.task_index != CHIEF or replica.key.attempt != job.attempt:
            return
        if replica.export is not None:
            self._export = replica.export
        if replica.error:
            self._upload_error = replica.error
        uploaded = replica.checkpoint
        if uploaded is not None and (job.checkpoint is None or uploaded.step > job.checkpoint.step):
            job.checkpoint = JobCheckpoint(uploaded.digest, uploaded.step, job.attempt)
            logger.info("job %s: checkpoint at step %d is in the registry (%s)", job.id, uploaded.step, uploaded.digest)
            await self._store.save_patiently(job)

    async def _stop_group(self, kill: bool, wait_seconds: float = 20.0) -> None:
        """Signals every running worker of the job (of any attempt: one an unreachable agent kept running must go
        too) and waits until the agents saw them exit, so their slots are free for the next attempt. Best effort:
        a lost agent cannot be reached."""
        job = self.job
        deadline = time.monotonic() + wait_seconds
        for agent in sorted({p.agent for p in job.placements}):
            signalled: set[ReplicaKey] = set()
            while time.monotonic() < deadline:
                try:
                    replicas = await self._agents.list_replicas(agent, job.id)
                    for replica in replicas:
                        await self._note_uploads(replica)  # a checkpoint uploaded as the chief went down
                    running = [r for r in replicas if r.state == ReplicaState.RUNNING]
                    for replica in running:
                        if replica.key not in signalled:
                            await self._agents.stop_replica(agent, replica.key, kill=kill)
                            signalled.add(replica.key)
                except ModelgridError:
                    break
                if not running:
                    break
                await asyncio.sleep(0.1)

    # -- the end -----------------------------------------------------------------------------------------------

    async def _finalize(self) -> None:
        job = self.job
        await self._transition(JobState.FINALIZING, EventType.STATE, "all workers finished; registering")
        metrics = self._export_metrics if self._export_metrics is not None else dict(job.metrics)
        if job.spec.register_model:
            if self._export is None:
                why = self._upload_error or "it announced none"
                job.failure = Failure(CHIEF, reason=f"the chief's agent uploaded no SavedModel to the registry: {why}")
                await self._end(JobState.FAILED, job.failure.reason)
                return
            try:
                version = await self._register_patiently(self._export, {**job.metrics, **metrics})
            except (ModelgridError, OSError) as exc:
                job.failure = Failure(reason=f"registering the model failed: {exc}")
                await self._end(JobState.FAILED, job.failure.reason)
                return
            if version is None:
                await self._transition(JobState.CANCELLING, EventType.STATE, "cancelling on request")
                await self._end(JobState.CANCELLED, "cancelled on request while waiting for the registry")
                return
            job.registered_version = version
            message = f"registered {job.spec.register_model}:{job.registered_version}"
            await self._save(self._event(EventType.REGISTERED, message, version=job.registered_version))
        job.metrics.update(metrics)
        await self._end(JobState.SUCCEEDED, "done")

    async def _register_patiently(self, export: Export, metrics: dict[str, float]) -> int | None:
        """Registers the export; while the registry is unavailable (or times out, or a concurrent change aborts
        the call) tries again with backoff for up to `register_retry_seconds`, the job FINALIZING with a message
        saying it waits. Each try reuses the job's request id, so one whose answer was lost does not create a
        second version. None when the job is cancelled while waiting; the last error once the time is up."""
        job, limit = self.job, self._settings.register_retry_seconds
        deadline = time.monotonic() + limit
        backoff = Backoff(initial=1.0, maximum=30.0)
        tries = 0
        while True:
            tries += 1
            try:
                return await self._register(job, export, metrics)
            except (Unavailable, DeadlineExceeded, Aborted) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if tries == 1:
                        raise
                    raise type(exc)(f"{exc} (gave up after {tries} tries in {limit:.0f}s)") from exc
                delay = min(backoff.next(), left)
                message = f"registering: try {tries} failed ({exc}); trying again in {delay:.1f}s, for {left:.0f}s more"
                logger.warning("job %s: %s", job.id, message)
                await self._transition(JobState.FINALIZING, EventType.STATE, message)
            try:
                async with asyncio.timeout(delay):
                    await self.cancel.wait()
                return None
            except TimeoutError:
                continue

    async def _end(self, state: JobState, message: str) -> None:
        failure = self.job.failure if state == JobState.FAILED else None
        await self._transition(state, EventType.STATE, message, failure=failure)
        for agent in {p.agent for p in self.job.placements}:
            try:
                await self._agents.release_ports(agent, self.job.id)
            except ModelgridError:
                continue

    # -- events ------------------------------------------------------------------------------------------------

    def _event(self, type_: EventType, message: str, **fields) -> JobEvent:
        return JobEvent(type_, self.job.state, self.job.attempt, time.time(), message=message, **fields)

    async def _transition(self, state: JobState, type_: EventType, message: str, **fields) -> None:
        self.job.move(state)
        self.job.message = message
        logger.info("job %s -> %s: %s", self.job.id, state.value, message)
        await self._save(self._event(type_, message, **fields))

    async def _save(self, event: JobEvent) -> None:
        await self._store.save_patiently(self.job, event)


MAX_JOB_METRICS = 64
"""Most metrics a job shows (the loss and its recipe's metrics, with their val_ twins)."""


def _only(metrics: dict[str, float], training: bool = False) -> dict[str, float]:
    """The metrics a job shows: every number the worker reported (`training`: without the val_ ones), bounded."""
    kept = {k: v for k, v in metrics.items() if not (training and k.startswith("val_"))}
    return dict(list(kept.items())[:MAX_JOB_METRICS])
