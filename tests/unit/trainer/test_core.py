"""TrainerCore in process: real agents (in this process, in the session's Consul, each with a work dir of its own)
running the stand-in worker, jobs in the session's Redis, data sets, checkpoints and exports in the in-process
registry. Scheduling and placement, the state machine as events, a failed worker restarting its group from the
checkpoint its chief's agent uploaded (on other agents when the chief's agent is lost), the restart budget,
preemption, cancelling, re-attaching after a trainer restart, and registration from the uploaded SavedModel."""

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_asyncio

from modelgrid.client.artifacts import file_digest
from modelgrid.client.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from modelgrid.client.registry import ArtifactFormat, AsyncRegistryClient
from modelgrid.client.registry.types import KIND_TAG, RECIPE_KIND
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.clients.agent import AgentClient, Export, WorkerSpec
from services.clients.agent.types import ReplicaKey, ReplicaState
from services.kit.channels import InstancePool
from services.kit.localinfra import free_port
from services.kit.server import GrpcService
from services.registry.main import start_registry
from services.registry.settings import RegistrySettings
from services.trainer.core import TrainerCore
from services.trainer.domain import EventType, Job, JobEvent, JobState
from services.trainer.exit_codes import ExitCode
from services.trainer.jobspec import Dataset, HyperParameters, JobSpec
from services.trainer.store import FencedOut

pytestmark = pytest.mark.asyncio(loop_scope="session")


def spec_of(digits_npz: Path, **fields) -> JobSpec:
    """Two workers, two epochs of four steps, a report and a checkpoint every two steps."""
    params = {"steps_per_epoch": 4, **fields.pop("recipe_params", {})}
    values = {
        "name": "fake",
        "recipe": "file:fake.py",  # takes any recipe_params: the fake worker's instructions (conftest)
        "recipe_params": params,
        "dataset": Dataset(format="npz", local_path=str(digits_npz)),
        "hyper_parameters": HyperParameters(epochs=2),
        "workers": 2,
        "checkpoint_every_steps": 2,
        "report_every_steps": 2,
        "step_delay_ms": 20,
        **fields,
    }
    return JobSpec(**values)


async def until_final(core: TrainerCore, job_id: str, timeout: float = 30) -> tuple[Job, list[JobEvent]]:
    """Every event of the job up to its final state, and the job then."""

    async def read() -> list[JobEvent]:
        return [event async for event in core.watch(job_id, "")]

    events = await asyncio.wait_for(read(), timeout)
    return await core.get(job_id), events


async def until(core: TrainerCore, job_id: str, predicate: Callable[[Job], bool], timeout: float = 30) -> Job:
    deadline = time.monotonic() + timeout
    while not predicate(job := await core.get(job_id)):
        assert job.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED), job
        assert time.monotonic() < deadline, f"gave up waiting on {job}"
        await asyncio.sleep(0.05)
    return job


def states(events: list[JobEvent]) -> list[str]:
    return [e.state.value for e in events if e.type == EventType.STATE]


async def ready(agent_client: AgentClient, count: int, timeout: float = 20) -> None:
    """Waits until `count` agents are healthy in Consul."""
    deadline = time.monotonic() + timeout
    while len(agent_client.agents) != count:
        assert time.monotonic() < deadline, f"expected {count} healthy agents, have {agent_client.agents}"
        await asyncio.sleep(0.05)


async def worker_pid(agent_client: AgentClient, job: Job, task: int) -> int:
    placement = next(p for p in job.placements if p.task_index == task)
    replicas = await agent_client.list_replicas(placement.agent, job.id)
    (replica,) = [r for r in replicas if r.key.task_index == task and r.key.attempt == job.attempt]
    assert replica.pid > 0, replica  # 0: not started yet (os.kill(0, ...) would signal this test's own group)
    return replica.pid


# -- the happy path ------------------------------------------------------------------------------------------------


async def test_a_job_is_spread_over_the_agents_and_walks_the_state_machine(agents, agent_client, cores, digits_npz):
    await agents(slots=2)
    await agents(slots=2)
    await ready(agent_client, 2)
    core = await cores()

    job = await core.submit(spec_of(digits_npz), request_id="once")
    assert (await core.submit(spec_of(digits_npz), request_id="once")).id == job.id
    done, events = await until_final(core, job.id)

    assert done.state == JobState.SUCCEEDED, done
    assert states(events) == ["PENDING", "SCHEDULING", "STARTING", "RUNNING", "FINALIZING", "SUCCEEDED"]
    assert len({p.agent for p in done.placements}) == 2, "two free slots on each agent: one replica each"
    assert [p.task_index for p in done.placements] == [0, 1]
    assert (done.attempt, done.restarts, done.preemptions, done.step, done.epoch) == (1, 0, 0, 8, 2)
    assert [e.step for e in events if e.type == EventType.STEP] == [2, 4, 6, 8]
    assert [e.epoch for e in events if e.type == EventType.EPOCH] == [1, 2]
    assert done.metrics["val_accuracy"] == 0.75 and done.metrics["steps"] == 8
    assert done.registered_version == 0 and not any(e.type == EventType.REGISTERED for e in events)
    assert sum(w.used for w in core.workers()) == 0
    for placement in done.placements:  # right after the end: the ports are released, the exited replicas forgotten
        deadline = time.monotonic() + 5
        while await agent_client.list_replicas(placement.agent, job.id):
            assert time.monotonic() < deadline, "the job's replicas were not released"
            await asyncio.sleep(0.05)


async def test_a_job_that_does_not_fit_waits_until_an_agent_joins(agents, agent_client, cores, digits_npz):
    await agents(slots=1)
    await agents(slots=1)
    await ready(agent_client, 2)
    core = await cores()

    job = await core.submit(spec_of(digits_npz, workers=3), request_id="")
    pending = await until(core, job.id, lambda j: "waiting for 3 free slots; 2 free" in j.message, timeout=10)
    assert pending.state == JobState.PENDING and not pending.placements
    await agents(slots=1)
    done, _ = await until_final(core, job.id)

    assert done.state == JobState.SUCCEEDED, done
    assert len({p.agent for p in done.placements}) == 3


# -- failures ------------------------------------------------------------------------------------------------------


async def test_a_failed_worker_restarts_the_group_from_its_checkpoint(agents, agent_client, cores, digits_npz):
    await agents(slots=2)
    await agents(slots=2)
    await ready(agent_client, 2)
    core = await cores()
    crash = {"exit_code": 3, "exit_task": 1, "exit_at_step": 5}
    spec = spec_of(digits_npz, recipe_params=crash, max_restarts=1, checkpoint_every_steps=4, step_delay_ms=100)

    job = await core.submit(spec, request_id="")
    done, events = await until_final(core, job.id)

    assert done.state == JobState.SUCCEEDED, done
    (restart,) = [e for e in events if e.type == EventType.RESTART]
    assert (restart.failure.task_index, restart.failure.exit_code) == (1, 3)
    assert "worker 1" in restart.failure.reason and "code 3" in restart.failure.reason
    (resumed,) = [e for e in events if e.type == EventType.RESUMED]
    assert resumed.step == 4, "the group did not resume from its checkpoint at step 4"
    assert resumed.recovery_seconds > 0
    assert states(events) == [
        "PENDING",
        "SCHEDULING",
        "STARTING",
        "RUNNING",
        "STARTING",
        "RUNNING",
        "FINALIZING",
        "SUCCEEDED",
    ]
    assert (done.attempt, done.restarts, done.preemptions) == (2, 1, 0)


async def test_a_group_whose_chiefs_agent_is_lost_resumes_elsewhere_from_the_uploaded_checkpoint(
    agents, agent_client, cores, digits_npz, tmp_path
):
    """Two one-slot agents run the job; the chief's agent is stopped (its host is gone: its work dir is deleted too)
    and a third agent with a work dir of its own joins. The group restarts on the survivor and the newcomer from the
    checkpoint the lost agent had uploaded to the registry: no path is shared between them."""
    services = {}
    for name in ("a", "b"):
        service = await agents(slots=1, work_dir=tmp_path / f"host-{name}")
        services[service.instance_id] = (service, tmp_path / f"host-{name}")
    await ready(agent_client, 2)
    core = await cores()
    spec = spec_of(digits_npz, recipe_params={"steps_per_epoch": 10}, step_delay_ms=100)

    job = await core.submit(spec, request_id="")
    uploaded = await until(core, job.id, lambda j: j.checkpoint is not None and j.checkpoint.step >= 4)
    assert uploaded.checkpoint.attempt == 1 and uploaded.dataset_digest == file_digest(digits_npz)
    chief_agent = next(p.agent for p in uploaded.placements if p.task_index == 0)
    lost, lost_dir = services.pop(chief_agent)
    await lost.stop()
    shutil.rmtree(lost_dir)  # nothing of the lost host may be needed any more
    waiting = await until(core, job.id, lambda j: j.state == JobState.PENDING, timeout=30)
    resume_from = waiting.checkpoint
    assert resume_from is not None and resume_from.step >= uploaded.checkpoint.step

    newcomer = await agents(slots=1, work_dir=tmp_path / "host-c")
    services[newcomer.instance_id] = (newcomer, tmp_path / "host-c")
    done, events = await until_final(core, job.id, timeout=60)

    assert done.state == JobState.SUCCEEDED, done
    assert chief_agent not in {p.agent for p in done.placements}
    (restart,) = [e for e in events if e.type == EventType.RESTART]
    assert restart.failure.agent == chief_agent
    (resumed,) = [e for e in events if e.type == EventType.RESUMED]
    assert resumed.step == resume_from.step, "the group did not resume from the uploaded checkpoint"
    assert done.step == 20 and done.attempt == 2
    assert not lost_dir.exists()
    for placement in done.placements:  # each replica of attempt 2 worked in its own agent's directories only
        work_dir = services[placement.agent][1]
        spec_path = work_dir / job.id / "2" / f"task-{placement.task_index}" / "spec.json"
        worker = WorkerSpec.from_json(spec_path.read_text())
        assert Path(worker.checkpoint_dir).is_relative_to(work_dir.resolve()), worker.checkpoint_dir
        assert worker.dataset.paths == (str(work_dir.resolve() / "cache" / "sha256" / done.dataset_digest),)
        assert json.loads(spec_path.read_text())["attempt"] == 2


async def test_kill_9_of_a_worker_is_a_failure_with_its_signal(agents, agent_client, cores, digits_npz):
    await agents(slots=2)
    await ready(agent_client, 1)
    core = await cores()

    job = await core.submit(spec_of(digits_npz, step_delay_ms=100), request_id="")
    running = await until(core, job.id, lambda j: j.state == JobState.RUNNING and j.step >= 2)
    os.kill(await worker_pid(agent_client, running, 0), signal.SIGKILL)
    done, events = await until_final(core, job.id)

    assert done.state == JobState.SUCCEEDED, done
    (restart,) = [e for e in events if e.type == EventType.RESTART]
    assert (restart.failure.task_index, restart.failure.exit_code) == (0, -signal.SIGKILL)
    assert "signal 9 (SIGKILL)" in restart.failure.reason


async def test_failures_beyond_the_budget_fail_the_job(agents, agent_client, cores, digits_npz):
    await agents(slots=2)
    await ready(agent_client, 1)
    core = await cores()
    always = {"exit_code": 3, "exit_at_step": 1, "exit_attempts": [1, 2, 3]}

    job = await core.submit(spec_of(digits_npz, recipe_params=always, max_restarts=1), request_id="")
    done, events = await until_final(core, job.id)

    assert done.state == JobState.FAILED
    assert done.restarts == 1 and done.failure.exit_code == 3
    assert "restart budget of 1 spent" in done.message
    assert len([e for e in events if e.type == EventType.RESTART]) == 1
    assert events[-1].failure is not None and events[-1].failure.exit_code == 3


async def test_an_unusable_spec_fails_at_once_and_a_preemption_is_free(agents, agent_client, cores, digits_npz):
    await agents(slots=4)
    await ready(agent_client, 1)
    core = await cores()
    invalid = {"exit_code": int(ExitCode.INVALID_SPEC), "exit_at_step": 1}
    preempted = {"exit_code": int(ExitCode.PREEMPTED), "exit_at_step": 3}

    bad = await core.submit(spec_of(digits_npz, recipe_params=invalid, max_restarts=3), request_id="")
    free = await core.submit(spec_of(digits_npz, recipe_params=preempted, max_restarts=0), request_id="")
    (bad_done, bad_events), (free_done, free_events) = await asyncio.gather(
        until_final(core, bad.id), until_final(core, free.id)
    )

    assert bad_done.state == JobState.FAILED and bad_done.restarts == 0 and bad_done.attempt == 1
    assert bad_done.message.startswith("unusable job") and not any(e.type == EventType.RESTART for e in bad_events)
    assert free_done.state == JobState.SUCCEEDED, free_done
    assert (free_done.restarts, free_done.preemptions) == (0, 1)
    (restart,) = [e for e in free_events if e.type == EventType.RESTART]
    assert restart.failure.exit_code == ExitCode.PREEMPTED and "not counted" in restart.message


# -- requests ------------------------------------------------------------------------------------------------------


async def test_cancel_while_running_stops_the_workers_and_frees_the_slots(agents, agent_client, cores, digits_npz):
    await agents(slots=2)
    await ready(agent_client, 1)
    core = await cores()

    job = await core.submit(spec_of(digits_npz, step_delay_ms=200), request_id="")
    running = await until(core, job.id, lambda j: j.state == JobState.RUNNING)
    assert sum(w.used for w in core.workers()) == 2
    await core.cancel(job.id)
    done, events = await until_final(core, job.id)

    assert done.state == JobState.CANCELLED and states(events)[-2:] == ["CANCELLING", "CANCELLED"]
    assert sum(w.used for w in core.workers()) == 0
    agent = running.placements[0].agent
    assert all(r.state == ReplicaState.EXITED for r in await agent_client.list_replicas(agent, job.id))
    with pytest.raises(FailedPrecondition):
        await core.cancel(job.id)


async def test_bad_requests_queue_nothing(agents, agent_client, cores, digits_npz, tmp_path):
    await agents(slots=1)
    await ready(agent_client, 1)
    core = await cores()
    csv = tmp_path / "data" / "data.csv"  # inside the data set roots (trainer_settings)
    csv.write_text("a,b,label\n1,2,0\n")
    secret = tmp_path / "data" / "secret.csv"
    secret.write_text("root:$y$j9T$hash-of-a-password:19000:0:99999:7:::\n")
    escape = tmp_path / "data" / "escape.csv"
    escape.symlink_to(secret.parent.parent / "outside.csv")
    (tmp_path / "outside.csv").write_text("label,a\n0,1\n")
    bad = [
        (spec_of(digits_npz, recipe="transformer"), "unknown recipe"),
        (spec_of(digits_npz, recipe="file:../x.py"), "recipe"),
        (spec_of(digits_npz, workers=0), "workers must be between"),
        (spec_of(digits_npz, hyper_parameters=HyperParameters(learning_rate=-1)), "learning_rate"),
        (spec_of(digits_npz, register_aliases=("prod",)), "needs register_model"),
        (spec_of(digits_npz, dataset=Dataset(format="npz", local_path=str(digits_npz), label_key="z")), "no array"),
        (spec_of(digits_npz, dataset=Dataset(format="csv", local_path=str(csv), label_column="y")), "no column"),
        # Outside the roots: the same answer whether the file exists or not, and nothing of it.
        (spec_of(digits_npz, dataset=Dataset(format="npz", local_path="/nope.npz")), "inside the trainer's data"),
        (spec_of(digits_npz, dataset=Dataset(format="csv", local_path="/etc/passwd")), "inside the trainer's data"),
        (spec_of(digits_npz, dataset=Dataset(format="csv", local_path=str(csv.parent / "../../x"))), "inside"),
        (spec_of(digits_npz, dataset=Dataset(format="csv", local_path=str(escape))), "inside the trainer's data"),
        (spec_of(digits_npz, dataset=Dataset(format="csv", local_path="data/data.csv")), "absolute"),
        # Inside: an error names what the spec asked for, never what the file holds.
        (spec_of(digits_npz, dataset=Dataset(format="csv", local_path=str(secret))), r"no column\(s\) \['label'\]$"),
        (spec_of(digits_npz, dataset=Dataset(format="npz", blob_digest="../../etc/passwd")), "64 lower-case hex"),
    ]
    for spec, fragment in bad:
        with pytest.raises(InvalidArgument, match=fragment) as caught:
            await core.submit(spec, request_id="")
        assert "root:" not in str(caught.value) and "hash-of" not in str(caught.value)
    assert not (tmp_path / "trainer-scratch" / "datasets").exists(), "a bad digest named a directory"
    assert (await core.list_jobs(None, 50, ""))[0] == []
    with pytest.raises(NotFound):
        await core.get("nope")
    with pytest.raises(NotFound):
        await core.cancel("nope")


async def test_a_restarted_trainer_re_attaches_to_running_workers(agents, agent_client, cores, digits_npz):
    await agents(slots=2)
    await ready(agent_client, 1)
    first = await cores()

    job = await first.submit(spec_of(digits_npz, step_delay_ms=100), request_id="")
    await until(first, job.id, lambda j: j.state == JobState.RUNNING and j.step >= 2)
    await first.stop()
    second = await cores()
    done, _ = await until_final(second, job.id)

    assert done.state == JobState.SUCCEEDED, done
    assert (done.attempt, done.restarts) == (1, 0), "the job was started again instead of re-attached"
    assert done.step == 8


async def test_a_deposed_leader_is_fenced_out_and_the_new_one_finishes_its_job_once(
    agents, agent_client, cores, digits_npz
):
    """A standby takes over (its claim carries a newer epoch) while the old leader, cut off, still follows a job:
    the agents refuse its calls that act on workers, its next write is refused and it steps down; the job is
    re-attached, not started again."""
    await agents(slots=2)
    await ready(agent_client, 1)
    old = await cores(epoch=1)
    fenced: list[bool] = []
    old.on_fenced = lambda: fenced.append(True)
    job = await old.submit(spec_of(digits_npz, step_delay_ms=100), request_id="")
    running = await until(old, job.id, lambda j: j.state == JobState.RUNNING and j.step >= 2)

    new = await cores(epoch=2)
    placement = running.placements[0]
    await new._leader_agents.list_replicas(placement.agent, job.id)  # as its re-attaching runner does
    with pytest.raises(FencedOut):  # the old leader, unaware yet, can no longer stop the workers the new one follows
        await old._leader_agents.stop_replica(placement.agent, ReplicaKey(job.id, 1, placement.task_index), kill=True)
    deadline = time.monotonic() + 10
    while not fenced:  # its next progress write
        assert time.monotonic() < deadline, "the deposed leader's writes were not refused"
        await asyncio.sleep(0.05)
    assert not old.leading
    old.leader_elsewhere = lambda: True  # what its election sees now
    with pytest.raises(Unavailable, match="standby"):
        await old.submit(spec_of(digits_npz), request_id="")
    with pytest.raises(FencedOut):
        await old._store.save(await new.get(job.id))

    done, events = await until_final(new, job.id)
    assert done.state == JobState.SUCCEEDED, done
    assert (done.attempt, done.restarts) == (1, 0), "the job was started again instead of re-attached"
    assert [e.state for e in events if e.type == EventType.STATE].count(JobState.STARTING) == 1


# -- registration --------------------------------------------------------------------------------------------------


async def test_a_finished_job_is_registered_with_its_lineage_and_aliases(
    agents, agent_client, cores, digits_npz, registry_client: AsyncRegistryClient, unique, trainer_settings
):
    await agents(slots=2)
    await ready(agent_client, 1)
    core = await cores(registry_client)
    model = unique("fake")

    job = await core.submit(spec_of(digits_npz, register_model=model, register_aliases=("production",)), "")
    done, events = await until_final(core, job.id)

    assert done.state == JobState.SUCCEEDED, done
    (registered,) = [e for e in events if e.type == EventType.REGISTERED]
    assert registered.version == done.registered_version == 1
    version = await registry_client.resolve(f"{model}@production")
    assert version.version == 1
    assert version.lineage.training_job_id == job.id and version.lineage.dataset_digest == done.dataset_digest
    assert version.lineage.source.startswith("modelgrid-trainer")
    assert version.metrics["val_accuracy"] == 0.75
    assert version.params["workers"] == "2" and version.params["epochs"] == "2"
    assert version.params["recipe"] == "file:fake.py"
    # The version was created from the blob the chief's agent uploaded: the registry holds it as a blob too.
    assert version.artifact.format == ArtifactFormat.SAVEDMODEL_TAR
    assert (await registry_client.stat_blob(version.artifact.digest)).size_bytes == version.artifact.size_bytes
    # A trainer registering the same job again (after a restart) gets the same version.
    assert await core.register(done, Export(version.artifact.digest), {}) == 1


FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def registering_messages(events: list[JobEvent]) -> list[str]:
    """The messages of the FINALIZING events that say the registration is waiting for the registry."""
    return [
        e.message
        for e in events
        if e.type == EventType.STATE and e.state == JobState.FINALIZING and e.message.startswith("registering: ")
    ]


class TrainersRegistry:
    """A second registry process on the in-process registry's state (its Redis keys and blob dir) at a port of its
    own, for the trainer only: stopping it is a registry outage for the trainer, while the agents go on fetching and
    uploading through the first."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings.model_copy(update={"port": free_port()})
        self.service: GrpcService | None = None

    async def start(self, client: AsyncRegistryClient | None = None) -> None:
        """Starts it; with `client`, returns once the client reaches it again (its channel reconnects)."""
        self.service = await start_registry(self.settings)
        deadline = time.monotonic() + 10
        while client is not None:
            try:
                await client.stat_blob("0" * 64)
            except NotFound:
                return
            except Unavailable:
                assert time.monotonic() < deadline, "the trainer's client does not reach the registry again"
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None


@pytest_asyncio.fixture(loop_scope="session")
async def trainers_registry(registry_settings, registry):
    door = TrainersRegistry(registry_settings)
    await door.start()
    pool = InstancePool(None, "registry", targets=[f"127.0.0.1:{door.settings.port}"], options=FAST_RECONNECT)
    await pool.start()
    yield door, AsyncRegistryClient(pool, client_id="pytest-trainer")
    await door.stop()
    await pool.close()


async def test_registration_waits_out_a_registry_outage_then_registers_once(
    agents, agent_client, cores, digits_npz, trainers_registry, unique
):
    await agents(slots=2)
    await ready(agent_client, 1)
    door, client = trainers_registry
    core = await cores(client)
    model = unique("fake")

    spec = spec_of(digits_npz, register_model=model, register_aliases=("production",), step_delay_ms=100)
    job = await core.submit(spec, "")
    await until(core, job.id, lambda j: j.state == JobState.RUNNING)
    await door.stop()
    waiting = await until(core, job.id, lambda j: j.message.startswith("registering: try"))
    assert waiting.state == JobState.FINALIZING and "registry is unavailable" in waiting.message

    await door.start()
    done, events = await until_final(core, job.id, timeout=60)

    assert done.state == JobState.SUCCEEDED and done.registered_version == 1, done
    assert registering_messages(events), "the job did not say that it waits for the registry"
    (registered,) = [e for e in events if e.type == EventType.REGISTERED]
    assert registered.version == 1
    assert [v.version for v in await client.list_versions(model)] == [1]
    version = await client.resolve(f"{model}@production")
    assert version.version == 1 and version.lineage.training_job_id == job.id


async def test_a_job_waits_pending_while_its_registry_recipe_cannot_be_fetched(
    agents, agent_client, cores, digits_npz, trainers_registry, trainer_settings, unique, tmp_path
):
    """A trainer that did not take the job (its scratch lacks the recipe) while the registry is down: the job
    waits, PENDING and saying why, and runs once the registry is back; it is not failed as an invalid spec."""
    door, client = trainers_registry
    core = await cores(client)
    name = unique("recipe")
    await client._stub().CreateModel(rpb.CreateModelRequest(name=name, tags={KIND_TAG: RECIPE_KIND}))
    source = tmp_path / "recipe.py"
    source.write_text("def build_model(input_shape, num_outputs, **params):\n    raise NotImplementedError\n")
    blob = await client.upload_blob(source)
    await client.create_version_from_blob(name, blob.digest, request_id=unique("r"), artifact_format=ArtifactFormat.RAW)

    job = await core.submit(spec_of(digits_npz, recipe=f"registry:{name}/1"), "")  # no agent yet: it waits
    for cached in (trainer_settings.scratch_dir / "recipes").glob("*.py"):
        cached.unlink()
    await door.stop()
    await agents(slots=2)
    await ready(agent_client, 1)
    waiting = await until(core, job.id, lambda j: j.message.startswith("waiting for the registry to fetch recipe"))
    assert waiting.state == JobState.PENDING

    await door.start(client)
    done, _ = await until_final(core, job.id, timeout=60)
    assert done.state == JobState.SUCCEEDED, done


class LosesTheFirstPushAnswer(AsyncRegistryClient):
    """The real client, except that the answer to its first version creation is lost after the registry committed
    the version (as when the connection drops right then): the caller sees Unavailable."""

    pushes = 0

    async def create_version_from_blob(self, *args, **kwargs):
        self.pushes += 1
        version = await super().create_version_from_blob(*args, **kwargs)
        if self.pushes == 1:
            raise Unavailable("registry failed (UNAVAILABLE)")
        return version


async def test_a_registration_whose_answer_was_lost_is_retried_without_a_second_version(
    agents, agent_client, cores, digits_npz, registry, registry_client, unique
):
    await agents(slots=2)
    await ready(agent_client, 1)
    pool = InstancePool(None, "registry", targets=[f"127.0.0.1:{registry.port}"])
    await pool.start()
    client = LosesTheFirstPushAnswer(pool, client_id="pytest")
    core = await cores(client)
    model = unique("fake")
    try:
        job = await core.submit(spec_of(digits_npz, register_model=model), "")
        done, events = await until_final(core, job.id, timeout=60)
    finally:
        await pool.close()

    assert done.state == JobState.SUCCEEDED and done.registered_version == 1, done
    assert client.pushes == 2 and len(registering_messages(events)) == 1
    assert [v.version for v in await registry_client.list_versions(model)] == [1]
    assert (await registry_client.get_model(model)).latest_version == 1


async def test_registration_gives_up_after_its_time_and_a_cancel_ends_the_wait(
    agents, agent_client, cores, digits_npz, trainer_settings, trainers_registry, unique
):
    await agents(slots=2)
    await ready(agent_client, 1)
    trainer_settings.register_retry_seconds = 1.5
    door, client = trainers_registry
    core = await cores(client)

    job = await core.submit(spec_of(digits_npz, register_model=unique("fake"), step_delay_ms=100), "")
    await until(core, job.id, lambda j: j.state == JobState.RUNNING)
    await door.stop()  # the trainer's registry is gone for good
    done, events = await until_final(core, job.id)
    assert done.state == JobState.FAILED, done
    assert done.failure.reason.startswith("registering the model failed: registry is unavailable")
    assert "gave up after" in done.failure.reason and registering_messages(events)

    trainer_settings.register_retry_seconds = 600
    await door.start(client)
    job = await core.submit(spec_of(digits_npz, register_model=unique("fake"), step_delay_ms=100), "")
    await until(core, job.id, lambda j: j.state == JobState.RUNNING)
    await door.stop()
    await until(core, job.id, lambda j: j.message.startswith("registering: try"))
    await core.cancel(job.id)
    done, events = await until_final(core, job.id)
    assert done.state == JobState.CANCELLED and done.registered_version == 0, done
    assert states(events)[-3:] == ["FINALIZING", "CANCELLING", "CANCELLED"]
