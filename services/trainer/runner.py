"""Runs one training job on its placed agents: start the group, follow it, restart it from the last checkpoint
when a worker fails, hangs or is lost, and finish by registering the model.

MultiWorkerMirroredStrategy cannot go on short-handed: when any worker dies the others die too, of
UnavailableError, seconds later. So the first worker to exit non-zero is the root cause, the rest of the group
is killed at once, and the whole group starts again on the same host:port list; the workers resume from the
checkpoint (BackupAndRestore) at the step it holds. Exit 42 is a preemption: it does not spend the restart
budget. Exit 2 is an unusable spec or data set: restarting cannot help, the job fails at once.
"""

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from modelgrid.trainer.v1 import trainer_pb2 as pb
from services.kit.errors import ModelgridError
from services.trainer.agents import AgentDirectory
from services.trainer.domain import EventType, Failure, Job, JobEvent, JobState
from services.trainer.settings import TrainerSettings
from services.trainer.specs import job_dir, worker_spec
from services.trainer.store import JobStore

logger = logging.getLogger(__name__)

EXIT_INVALID_SPEC = 2
EXIT_PREEMPTED = 42
CHIEF = 0


@dataclass
class Outcome:
    """How an attempt ended."""

    kind: str  # succeeded | failed | preempted | invalid | hang | lost | blocked | cancelled
    failure: Failure | None = None


Register = Callable[[Job, Path, dict[str, float]], Awaitable[int]]
"""Pushes the exported SavedModel to the registry; returns the version number."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class JobRunner:
    """Drives one job to a final state. Cancelled (trainer shutdown) it leaves the job as it is, so that the
    next trainer re-attaches to the workers that keep running."""

    def __init__(
        self,
        job: Job,
        store: JobStore,
        agents: AgentDirectory,
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
        self._failed_at = 0.0
        self._preempted_step = 0
        self._resume_step = 0
        self._started_at = time.monotonic()
        self._last_progress = time.monotonic()
        self._export: tuple[Path, dict[str, float]] | None = None

    # -- the loop ----------------------------------------------------------------------------------------------

    async def run(self, reattach: bool = False) -> None:
        job = self.job
        outcome = await self._reattach() if reattach else None
        backoff = self._settings.restart_backoff_seconds
        while True:
            if outcome is None:
                if self.cancel.is_set():
                    outcome = Outcome("cancelled")
                else:
                    outcome = await self._start_attempt() or await self._follow()
            if outcome.kind == "succeeded":
                await self._finalize()
                return
            if outcome.kind == "cancelled":
                await self._transition(JobState.CANCELLING, EventType.STATE, "cancelling on request")
                await self._stop_group(kill=True)
                await self._end(JobState.CANCELLED, "cancelled on request")
                return
            await self._stop_group(kill=True)
            job.failure = outcome.failure or Failure(reason=outcome.kind)
            if outcome.kind == "invalid":
                await self._end(JobState.FAILED, f"unusable job: {job.failure.reason}")
                return
            if outcome.kind == "preempted":
                job.preemptions += 1
            elif outcome.kind == "blocked":
                pass
            elif job.restarts >= self._max_restarts:
                await self._end(JobState.FAILED, f"restart budget of {self._max_restarts} spent; last cause: "
                                                 f"{job.failure.reason}")  # fmt: skip
                return
            else:
                job.restarts += 1
            self._failed_at = self._failed_at or time.time()
            await self._transition(
                JobState.RESTARTING,
                EventType.RESTART,
                f"{outcome.kind}: {job.failure.reason}; restart {job.restarts}/{self._max_restarts}"
                f"{' (preemption, not counted)' if outcome.kind == 'preempted' else ''}",
                failure=job.failure,
                step=self._preempted_step if outcome.kind == "preempted" and self._preempted_step else job.step,
            )
            self._preempted_step = 0
            if outcome.kind == "lost" and not await self._replace(job):
                return  # back to PENDING: the scheduler starts it again when slots free up
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            outcome = None

    @property
    def _max_restarts(self) -> int:
        value = self.job.spec.get("max_restarts")
        return self._settings.default_max_restarts if value is None else int(value)

    # -- one attempt -------------------------------------------------------------------------------------------

    def _tf_config(self, task_index: int) -> str:
        cluster = {"worker": [p.address for p in sorted(self.job.placements, key=lambda p: p.task_index)]}
        return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": task_index}})

    async def _start_attempt(self) -> Outcome | None:
        job = self.job
        job.attempt += 1
        await self._transition(JobState.STARTING, EventType.STATE, f"starting attempt {job.attempt} on "
                               f"{sorted({p.agent for p in job.placements})}")  # fmt: skip
        self._started_at = time.monotonic()
        spec = json.dumps(worker_spec(job, self._settings))
        for placement in job.placements:
            request = pb.StartReplicaRequest(
                job_id=job.id, attempt=job.attempt, task_index=placement.task_index,
                tf_config=self._tf_config(placement.task_index), worker_spec=spec,
            )  # fmt: skip
            try:
                await self._agents.stub(placement.agent).StartReplica(request, timeout=30)
            except (grpc.aio.AioRpcError, ModelgridError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                reason = f"could not start worker {placement.task_index} on {placement.agent}: {detail}"
                logger.warning("job %s: %s", job.id, reason)
                if placement.agent not in self._agents.agents:
                    kind = "lost"
                elif isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    kind = "blocked"  # an earlier worker still holds the slot: wait, without spending the budget
                else:
                    kind = "failed"
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
                stub = self._agents.stub(agent, healthy_only=False)
                reply = await stub.ListReplicas(pb.ListReplicasRequest(job_id=job.id), timeout=10)
            except (grpc.aio.AioRpcError, ModelgridError):
                return Outcome("lost", Failure(agent=agent, reason=f"agent {agent} is gone"))
            known += sum(1 for r in reply.replicas if r.attempt == job.attempt)
        if known == 0:
            return None
        logger.info("job %s: re-attached to attempt %d", job.id, job.attempt)
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
                    outcome = Outcome("lost", Failure(agent=agent, reason=f"agent {agent} was lost ({payload})"))
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
                stub = self._agents.stub(agent, healthy_only=False)
                stream = stub.WatchReplicas(pb.WatchReplicasRequest(job_id=self.job.id))
                async for event in stream:
                    await events.put(("replica", agent, event))
            except (grpc.aio.AioRpcError, ModelgridError) as exc:
                if agent not in self._agents.agents:
                    await events.put(("lost", agent, str(exc)))
                    return
            await asyncio.sleep(0.5)

    async def _tick(self, events: asyncio.Queue) -> None:
        while True:
            await asyncio.sleep(0.5)
            await events.put(("tick", "", None))

    def _check_health(self, agents: list[str]) -> Outcome | None:
        if self.cancel.is_set():
            return Outcome("cancelled")
        healthy = self._agents.agents
        for agent in agents:
            if agent not in healthy:
                return Outcome("lost", Failure(agent=agent, reason=f"agent {agent} turned critical in Consul"))
        now = time.monotonic()
        if self.job.state == JobState.STARTING and now - self._started_at > self._settings.start_timeout_seconds:
            return Outcome("hang", Failure(reason=f"workers did not start within "
                                                  f"{self._settings.start_timeout_seconds:.0f}s"))  # fmt: skip
        limit = self.job.spec.get("hang_timeout_seconds") or self._settings.hang_timeout_seconds
        if self.job.state == JobState.RUNNING and now - self._last_progress > limit:
            return Outcome("hang", Failure(reason=f"no step progress for {limit:.0f}s"))
        return None

    async def _on_replica_event(
        self, agent: str, event: pb.ReplicaEvent, started: set[int], exited: dict[int, int]
    ) -> Outcome | None:
        job, replica = self.job, event.replica
        if replica.attempt != job.attempt:
            return None  # a late word from an earlier attempt
        task = replica.task_index
        if event.progress:
            await self._on_progress(task, json.loads(event.progress), started)
            return None
        if replica.state != pb.REPLICA_STATE_EXITED or task in exited:
            return None
        exited[task] = replica.exit_code
        if replica.exit_code == 0:
            if len(exited) == job.workers and all(code == 0 for code in exited.values()):
                return Outcome("succeeded")
            return None
        failure = Failure(task, agent, replica.exit_code, f"worker {task} on {agent} exited with "
                                                          f"{describe_exit(replica.exit_code)}")  # fmt: skip
        self._failed_at = time.time()
        logger.warning("job %s attempt %d: %s", job.id, job.attempt, failure.reason)
        if replica.exit_code == EXIT_PREEMPTED:
            return Outcome("preempted", failure)
        if replica.exit_code == EXIT_INVALID_SPEC:
            return Outcome("invalid", failure)
        return Outcome("failed", failure)

    async def _on_progress(self, task: int, line: dict, started: set[int]) -> None:
        job = self.job
        kind = line.get("event")
        self._last_progress = time.monotonic()
        if kind == "started":
            started.add(task)
            if task == CHIEF:
                self._resume_step = int(line.get("initial_step", 0))
            if len(started) == job.workers and job.state == JobState.STARTING:
                await self._transition(JobState.RUNNING, EventType.STATE, f"attempt {job.attempt}: all "
                                       f"{job.workers} workers training")  # fmt: skip
            return
        if kind == "preempted" and line.get("step") is not None:
            self._preempted_step = int(line["step"])
        if task != CHIEF:
            return
        if kind == "step":
            job.step, job.epoch = int(line["step"]), int(line.get("epoch", job.epoch))
            job.metrics.update(_numbers(line, ("loss", "accuracy")))
            if job.state == JobState.STARTING:
                await self._transition(JobState.RUNNING, EventType.STATE, f"attempt {job.attempt}: training")
            if self._failed_at:
                recovery = time.time() - self._failed_at
                self._failed_at = 0.0
                await self._store.save(job, self._event(
                    EventType.RESUMED, f"training again at step {self._resume_step} after "
                                       f"{recovery:.1f}s", step=self._resume_step,
                    recovery_seconds=recovery,
                ))  # fmt: skip
            await self._store.save(job, self._event(EventType.STEP, "", step=job.step, epoch=job.epoch,
                                                    metrics=dict(job.metrics)))  # fmt: skip
        elif kind == "epoch":
            job.epoch = int(line["epoch"])
            job.metrics.update(_numbers(line, ("loss", "accuracy", "val_loss", "val_accuracy")))
            await self._store.save(job, self._event(EventType.EPOCH, f"epoch {job.epoch} done", step=job.step,
                                                    epoch=job.epoch, metrics=dict(job.metrics)))  # fmt: skip
        elif kind == "exported":
            self._export = (Path(line["path"]), {k: float(v) for k, v in line.get("metrics", {}).items()
                                                 if isinstance(v, int | float)})  # fmt: skip

    async def _stop_group(self, kill: bool, wait_seconds: float = 20.0) -> None:
        """Signals every running worker of the job (of any attempt: one an unreachable agent kept running must go
        too) and waits until the agents saw them exit, so their slots are free for the next attempt. Best effort:
        a lost agent cannot be reached."""
        job = self.job
        deadline = time.monotonic() + wait_seconds
        for agent in sorted({p.agent for p in job.placements}):
            try:
                stub = self._agents.stub(agent, healthy_only=False)
            except ModelgridError:
                continue
            signalled: set[tuple[int, int]] = set()
            while time.monotonic() < deadline:
                try:
                    reply = await stub.ListReplicas(pb.ListReplicasRequest(job_id=job.id), timeout=10)
                    running = [r for r in reply.replicas if r.state == pb.REPLICA_STATE_RUNNING]
                    for replica in running:
                        if (replica.attempt, replica.task_index) not in signalled:
                            await stub.StopReplica(pb.StopReplicaRequest(
                                job_id=job.id, attempt=replica.attempt, task_index=replica.task_index, kill=kill,
                            ), timeout=10)  # fmt: skip
                            signalled.add((replica.attempt, replica.task_index))
                except grpc.aio.AioRpcError:
                    break
                if not running:
                    break
                await asyncio.sleep(0.1)

    # -- the end -----------------------------------------------------------------------------------------------

    async def _finalize(self) -> None:
        job = self.job
        await self._transition(JobState.FINALIZING, EventType.STATE, "all workers finished; registering")
        path, metrics = self._export or (job_dir(self._settings, job) / "export", dict(job.metrics))
        if job.spec.get("register_model"):
            if not (path / "saved_model.pb").exists():
                job.failure = Failure(CHIEF, reason=f"the chief exported no SavedModel at {path}")
                await self._end(JobState.FAILED, job.failure.reason)
                return
            try:
                job.registered_version = await self._register(job, path, {**job.metrics, **metrics})
            except (grpc.RpcError, ModelgridError, OSError) as exc:
                job.failure = Failure(reason=f"registering the model failed: {exc}")
                await self._end(JobState.FAILED, job.failure.reason)
                return
            await self._store.save(job, self._event(
                EventType.REGISTERED, f"registered {job.spec['register_model']}:{job.registered_version}",
                version=job.registered_version,
            ))  # fmt: skip
        job.metrics.update(metrics)
        await self._end(JobState.SUCCEEDED, "done")

    async def _end(self, state: JobState, message: str) -> None:
        await self._transition(state, EventType.STATE, message, failure=self.job.failure if state ==
                               JobState.FAILED else None)  # fmt: skip
        for agent in {p.agent for p in self.job.placements}:
            try:
                stub = self._agents.stub(agent, healthy_only=False)
                await stub.ReleasePorts(pb.ReleasePortsRequest(job_id=self.job.id), timeout=10)
            except (grpc.aio.AioRpcError, ModelgridError):
                continue

    # -- events ------------------------------------------------------------------------------------------------

    def _event(self, type_: EventType, message: str, **fields) -> JobEvent:
        return JobEvent(type_, self.job.state, self.job.attempt, time.time(), message=message, **fields)

    async def _transition(self, state: JobState, type_: EventType, message: str, **fields) -> None:
        self.job.move(state)
        self.job.message = message
        logger.info("job %s -> %s: %s", self.job.id, state.value, message)
        await self._store.save(self.job, self._event(type_, message, **fields))


def _numbers(line: dict, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(line[k]) for k in keys if isinstance(line.get(k), int | float)}
