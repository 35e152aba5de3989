"""JobRunner in process, without the scheduler: a job placed by hand on real agents (in this process, in the
session's Consul) running the stand-in worker, its state in the session's Redis, its data set in the in-process
registry. The runner hands the SavedModel blob the chief's agent uploaded to its register callback, and asks its
replace callback for new agents when one is lost."""

import asyncio
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent import AgentClient, Export
from services.kit.redis_client import create_redis
from services.trainer.domain import EventType, Job, JobState, Placement
from services.trainer.jobspec import Dataset, HyperParameters, JobSpec
from services.trainer.runner import JobRunner
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def healthy(agent_client: AgentClient, count: int, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(agent_client.agents) != count:
        assert time.monotonic() < deadline, f"expected {count} healthy agents, have {agent_client.agents}"
        await asyncio.sleep(0.05)
    return sorted(agent_client.agents)


async def placed_job(
    agent_client: AgentClient, agents: list[str], registry: AsyncRegistryClient, digits_npz: Path, **fields
) -> Job:
    """A job scheduled by hand: one replica per agent given, ports reserved, its data set a registry blob,
    SCHEDULING (as the core leaves it)."""
    spec = JobSpec(
        recipe="mlp",
        recipe_params={"steps_per_epoch": 4},
        dataset=Dataset(format="npz", local_path=str(digits_npz)),
        hyper_parameters=HyperParameters(epochs=2),
        workers=len(agents),
        checkpoint_every_steps=2,
        report_every_steps=2,
        **fields,
    )
    blob = await registry.upload_blob(digits_npz)
    job = Job(id=uuid.uuid4().hex[:12], spec=spec, dataset_digest=blob.digest, state=JobState.SCHEDULING)
    for task, agent in enumerate(agents):
        (port,) = await agent_client.reserve_ports(agent, job.id, 1)
        job.placements.append(Placement(task, agent, f"{agent_client.agents[agent].host}:{port}"))
    return job


@pytest_asyncio.fixture(loop_scope="session")
async def store(trainer_settings: TrainerSettings) -> AsyncIterator[JobStore]:
    redis = create_redis(trainer_settings.redis_url)
    yield JobStore(redis, trainer_settings.redis_key_prefix)
    await redis.aclose()


async def test_a_runner_finishes_its_job_and_hands_the_export_to_register(
    agents, agent_client, store, trainer_settings, digits_npz, registry_client, tmp_path
):
    await agents(slots=1)
    await agents(slots=1)
    names = await healthy(agent_client, 2)
    job = await placed_job(agent_client, names, registry_client, digits_npz, register_model="m")
    registered: list[tuple[str, Export, dict[str, float]]] = []

    async def register(job: Job, export: Export, metrics: dict[str, float]) -> int:
        registered.append((job.id, export, metrics))
        return 7

    async def replace(job: Job) -> bool:
        raise AssertionError("no agent was lost")

    runner = JobRunner(job, store, agent_client, trainer_settings, register, replace)
    await asyncio.wait_for(runner.run(), 30)

    assert job.state == JobState.SUCCEEDED and job.registered_version == 7
    ((job_id, export, metrics),) = registered
    assert job_id == job.id and export.size_bytes > 0
    await registry_client.download_blob(export.digest, tmp_path / "export.tar")  # what the chief's agent uploaded
    with tarfile.open(tmp_path / "export.tar") as tar:
        assert tar.getnames() == ["saved_model.pb"]
    assert job.checkpoint is not None and job.checkpoint.step == 8 and job.checkpoint.attempt == 1
    assert metrics["val_accuracy"] == 0.75 and metrics["steps"] == 8 and metrics["loss"] == 1 / 8
    stored = await store.get(job.id)
    assert stored.state == JobState.SUCCEEDED and stored.registered_version == 7 and stored.spec == job.spec
    events = await store.events(job.id, "0", block_ms=0)
    assert [e.type for e in events][-3:] == [EventType.STATE, EventType.REGISTERED, EventType.STATE]
    assert events[-2].version == 7 and events[-2].message == "registered m:7"


async def test_a_lost_agent_sends_the_job_back_for_new_agents(
    agents, agent_client, store, trainer_settings, digits_npz, registry_client
):
    await agents(slots=1)
    doomed = await agents(slots=1)
    names = await healthy(agent_client, 2)
    job = await placed_job(agent_client, names, registry_client, digits_npz, step_delay_ms=200)
    asked: list[JobState] = []

    async def register(job: Job, export: Export, metrics: dict[str, float]) -> int:
        raise AssertionError("the job cannot finish")

    async def replace(job: Job) -> bool:
        asked.append(job.state)
        return False  # nothing fits now: the core would queue the job again

    runner = JobRunner(job, store, agent_client, trainer_settings, register, replace)
    task = asyncio.create_task(runner.run())
    deadline = time.monotonic() + 20
    while job.state != JobState.RUNNING:
        assert time.monotonic() < deadline and not task.done(), job
        await asyncio.sleep(0.05)
    await doomed.stop()
    await asyncio.wait_for(task, 30)

    assert asked == [JobState.RESTARTING]
    lost = doomed.instance_id
    assert job.failure.agent == lost and lost in job.failure.reason
    assert (job.restarts, job.attempt) == (0, 1), "a lost host must not spend the job's restart budget"
    survivor = next(p.agent for p in job.placements if p.agent != lost)
    replicas = await agent_client.list_replicas(survivor, job.id)
    assert replicas and all(r.exit_code != 0 for r in replicas), "the surviving worker was not stopped"
