"""In-process fixtures of the trainer's unit tests: worker agents started in this process on port 0 and registered
in the session's real Consul (under a service name of their own per test), running a small stand-in worker program;
the typed agent client over a real InstancePool; and TrainerCore on the session's real Redis.

The stand-in worker speaks the real contracts: it reads its WorkerSpec with `WorkerSpec.from_json`, writes
`services.trainer.progress` events and exits with `ExitCode`s, in a fraction of a second instead of the seconds a
TensorFlow worker needs to start. Its behaviour comes from the spec's recipe_params (see FAKE_WORKER).
"""

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from services.clients.agent import AgentClient
from services.clients.registry import AsyncRegistryClient
from services.kit.channels import InstancePool
from services.kit.consul import ConsulClient
from services.kit.processes import REPO_ROOT
from services.kit.redis_client import create_redis
from services.kit.server import GrpcService
from services.trainer.agent.main import start_agent
from services.trainer.agent.settings import AgentSettings
from services.trainer.core import TrainerCore
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore

# recipe_params it understands: steps_per_epoch (4); exit_code, exit_task (0), exit_at_step, exit_attempts ([1]):
# that task exits with that code at that step on those attempts. The workers of an attempt wait for each other
# before they start; the chief "checkpoints" the step every checkpoint_every_steps steps into checkpoint_dir, and a
# restarted group starts from there.
FAKE_WORKER = r"""
import json, os, signal, sys, time
from pathlib import Path

from services.trainer.exit_codes import ExitCode
from services.trainer.progress import Epoch, Exported, Finished, Preempted, Started, Step
from services.clients.agent.worker_spec import WorkerSpec

spec = WorkerSpec.from_json(Path(sys.argv[sys.argv.index("--spec") + 1]).read_text())
config = json.loads(os.environ.get("TF_CONFIG") or "{}")
task, workers = config["task"]["index"], len(config["cluster"]["worker"])
progress = open(os.environ["MODELGRID_PROGRESS_FILE"], "a")


def emit(event):
    progress.write(event.to_json() + "\n")
    progress.flush()


checkpoints = Path(spec.checkpoint_dir)
checkpoints.mkdir(parents=True, exist_ok=True)
counter = checkpoints / f"attempts-{task}"
attempt = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(attempt))
saved = checkpoints / "step"
current = initial = int(saved.read_text() or 0) if saved.exists() else 0
# Like a real group, the workers of an attempt start training together.
(checkpoints / f"joined-{attempt}-{task}").touch()
while len(list(checkpoints.glob(f"joined-{attempt}-*"))) < workers:
    time.sleep(0.01)
params = spec.recipe_params
per_epoch = int(params.get("steps_per_epoch", 4))
total = spec.epochs * per_epoch


def preempted(*_):
    emit(Preempted(task=task, step=current))
    os._exit(ExitCode.PREEMPTED)


signal.signal(signal.SIGTERM, preempted)
emit(Started(task=task, workers=workers, attempt=attempt, initial_step=initial, steps_per_epoch=per_epoch,
             epochs=spec.epochs))
for step in range(initial + 1, total + 1):
    time.sleep(spec.step_delay_ms / 1000)
    current = step
    if task == 0 and step % spec.checkpoint_every_steps == 0:
        (checkpoints / "step.partial").write_text(str(step))
        (checkpoints / "step.partial").rename(saved)
    if (step == params.get("exit_at_step") and task == params.get("exit_task", 0)
            and attempt in params.get("exit_attempts", [1])):
        os._exit(int(params["exit_code"]))
    metrics = {"loss": 1.0 / step, "accuracy": step / total}
    if step % spec.report_every_steps == 0:
        emit(Step(step=step, epoch=(step - 1) // per_epoch + 1, metrics=metrics))
    if step % per_epoch == 0:
        emit(Epoch(epoch=step // per_epoch, metrics={**metrics, "val_loss": 2.0 / step, "val_accuracy": 0.5}))
if task == 0 and spec.export_dir:
    export = Path(spec.export_dir)
    export.mkdir(parents=True, exist_ok=True)
    (export / "saved_model.pb").write_bytes(b"")
    emit(Exported(path=str(export), metrics={"val_accuracy": 0.75, "steps": total}))
emit(Finished(task=task, step=total))
"""


@pytest.fixture(scope="session")
def fake_worker(tmp_path_factory) -> list[str]:
    """The command of the stand-in worker."""
    script = tmp_path_factory.mktemp("fake-worker") / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


@pytest.fixture
def agent_service() -> str:
    """The Consul service name of this test's agents (no test sees another's)."""
    return f"trainer-agent-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture(loop_scope="session")
async def agents(consul, tmp_path, agent_service, fake_worker) -> AsyncIterator[Callable[..., Awaitable[GrpcService]]]:
    """`await agents(slots=2, worker=None)`: starts one more agent in this process (the stand-in worker unless
    `worker` names another command); every agent still running is stopped after the test."""
    started: list[GrpcService] = []

    async def start(slots: int = 2, worker: list[str] | None = None) -> GrpcService:
        settings = AgentSettings(
            port=0,
            consul_url=consul.http_url,
            consul_check_interval="1s",
            service_name=agent_service,
            slots=slots,
            work_dir=tmp_path / f"agent-{len(started)}",
            worker_command=worker or fake_worker,
            worker_env={"PYTHONPATH": str(REPO_ROOT), "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
            worker_stop_grace_seconds=1,
            shutdown_grace_seconds=0.2,
        )
        started.append(await start_agent(settings))
        return started[-1]

    yield start
    for service in reversed(started):
        await service.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def agent_client(consul, agent_service) -> AsyncIterator[AgentClient]:
    """The typed client over a pool following this test's agents in Consul."""
    consul_client = ConsulClient(consul.http_url)
    pool = InstancePool(consul_client, agent_service, close_grace=1.0)
    await pool.start()
    yield AgentClient(pool)
    await pool.close()
    await consul_client.close()


@pytest.fixture
def trainer_settings(redis_server, tmp_path, agent_service) -> TrainerSettings:
    """Trainer settings for this test: its own Redis keys, shared and recipes directories, and agents; short
    pauses so that restarts take tenths of a second."""
    (tmp_path / "recipes").mkdir()
    return TrainerSettings(
        port=0,
        consul_enabled=False,
        redis_url=redis_server.url,
        shared_dir=tmp_path / "shared",
        recipes_dir=tmp_path / "recipes",
        agent_service=agent_service,
        redis_key_prefix=f"mg:unit-trainer:{uuid.uuid4().hex[:8]}:",
        restart_backoff_seconds=0.1,
        schedule_interval_seconds=0.2,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def cores(trainer_settings, agent_client) -> AsyncIterator[Callable[..., Awaitable[TrainerCore]]]:
    """`await cores(registry=None)`: a started TrainerCore on this test's Redis keys and agents (several share the
    store, as trainers restarted one after the other do); every core is stopped after the test. Without a registry
    client the core gets one that is never called (jobs with a local data set and no register_model)."""
    redis = create_redis(trainer_settings.redis_url)
    pools: list[InstancePool] = []
    started: list[TrainerCore] = []

    async def start(registry: AsyncRegistryClient | None = None) -> TrainerCore:
        if registry is None:
            pools.append(InstancePool(None, "registry", targets=["127.0.0.1:9"]))
            await pools[-1].start()
            registry = AsyncRegistryClient(pools[-1])
        trainer_settings.shared_dir.mkdir(parents=True, exist_ok=True)
        core = TrainerCore(JobStore(redis, trainer_settings.redis_key_prefix), agent_client, registry, trainer_settings)
        await core.start()
        started.append(core)
        return core

    yield start
    for core in started:
        await core.stop()
    for pool in pools:
        await pool.close()
    await redis.aclose()


@pytest.fixture
def digits_npz() -> Path:
    return REPO_ROOT / "data" / "digits" / "digits.npz"
