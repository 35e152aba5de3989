"""In-process fixtures of the trainer's unit tests: worker agents started in this process on port 0 and registered
in the session's real Consul (under a service name of their own per test), each with a work dir of its own (no path
is shared: data sets, checkpoints and exports move through the in-process registry), running a small stand-in worker
program; the typed agent client over a real InstancePool; and TrainerCore on the session's real Redis.

The stand-in worker speaks the real contracts: it reads the WorkerSpec its agent wrote with `WorkerSpec.from_json`,
writes `services.trainer.progress` events and exits with `ExitCode`s, in a fraction of a second instead of the
seconds a TensorFlow worker needs to start. Its behaviour comes from the spec's recipe_params (see FAKE_WORKER).
"""

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent import AgentClient
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
# that task exits with that code at that step on those attempts. The workers of an attempt join like a real group
# (each listens on its TF_CONFIG address until it reached every peer and every peer reached it). The chief saves
# the step into checkpoint_dir/backup/chief every checkpoint_every_steps steps and, every snapshot_checkpoint_every
# saves, copies it into snapshots/step-<n> and announces it for its agent to upload; a restarted group starts from
# backup/chief, which its agent restored from the registry.
FAKE_WORKER = r"""
import json, os, signal, socket, sys, time
from pathlib import Path

from services.trainer.exit_codes import ExitCode
from services.trainer.progress import CheckpointSaved, Epoch, Exported, Finished, Preempted, Started, Step
from services.clients.agent.worker_spec import WorkerSpec

spec = WorkerSpec.from_json(Path(sys.argv[sys.argv.index("--spec") + 1]).read_text())
config = json.loads(os.environ.get("TF_CONFIG") or "{}")
addresses = config["cluster"]["worker"]
task, workers, attempt = config["task"]["index"], len(addresses), spec.attempt
progress = open(os.environ["MODELGRID_PROGRESS_FILE"], "a")
assert all(Path(p).is_file() for p in spec.dataset.paths), spec.dataset.paths


def emit(event):
    progress.write(event.to_json() + "\n")
    progress.flush()


def join_group():
    host, port = addresses[task].rsplit(":", 1)
    for _ in range(100):
        try:
            server = socket.create_server((host, int(port)))
            break
        except OSError:
            time.sleep(0.05)
    server.settimeout(0.02)
    peers = set(range(workers)) - {task}
    reached, reached_by = set(), set()
    while reached != peers or reached_by != peers:
        for peer in peers - reached:
            peer_host, peer_port = addresses[peer].rsplit(":", 1)
            try:
                with socket.create_connection((peer_host, int(peer_port)), timeout=0.2) as conn:
                    conn.sendall(f"{attempt} {task}\n".encode())
                reached.add(peer)
            except OSError:
                pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(1)
            hello = conn.recv(64).decode().split()
        if len(hello) == 2 and int(hello[0]) == attempt:
            reached_by.add(int(hello[1]))
    return server  # kept open to the end: a peer still joining reaches it


checkpoints = Path(spec.checkpoint_dir)
backup = checkpoints / "backup" / "chief"
current = initial = int((backup / "step").read_text()) if (backup / "step").exists() else 0
group = join_group()
params = spec.recipe_params
per_epoch = int(params.get("steps_per_epoch", 4))
total = spec.epochs * per_epoch
saves = 0


def save(step):
    backup.mkdir(parents=True, exist_ok=True)
    (backup / "step.partial").write_text(str(step))
    (backup / "step.partial").rename(backup / "step")


def snapshot(step):
    target = checkpoints / "snapshots" / f"step-{step}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "step").write_text(str(step))
    emit(CheckpointSaved(step=step, path=str(target)))


def preempted(*_):
    if task == 0 and spec.snapshot_checkpoint_every:
        save(current)
        snapshot(current)
    emit(Preempted(task=task, step=current))
    os._exit(ExitCode.PREEMPTED)


signal.signal(signal.SIGTERM, preempted)
emit(Started(task=task, workers=workers, attempt=attempt, initial_step=initial, steps_per_epoch=per_epoch,
             epochs=spec.epochs))
for step in range(initial + 1, total + 1):
    time.sleep(spec.step_delay_ms / 1000)
    current = step
    if task == 0 and step % spec.checkpoint_every_steps == 0:
        save(step)
        saves += 1
        if spec.snapshot_checkpoint_every and saves % spec.snapshot_checkpoint_every == 0:
            snapshot(step)
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
async def agents(
    consul, tmp_path, agent_service, fake_worker, registry
) -> AsyncIterator[Callable[..., Awaitable[GrpcService]]]:
    """`await agents(slots=2, worker=None, work_dir=None)`: starts one more agent in this process (the stand-in worker
    unless `worker` names another command), with a work dir of its own (`tmp_path/agent-<n>` unless given) and the
    in-process registry; every agent still running is stopped after the test."""
    started: list[GrpcService] = []

    async def start(slots: int = 2, worker: list[str] | None = None, work_dir: Path | None = None) -> GrpcService:
        settings = AgentSettings(
            port=0,
            consul_url=consul.http_url,
            consul_check_interval="1s",
            service_name=agent_service,
            slots=slots,
            work_dir=work_dir or tmp_path / f"agent-{len(started)}",
            worker_command=worker or fake_worker,
            worker_env={"PYTHONPATH": str(REPO_ROOT), "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
            worker_stop_grace_seconds=1,
            shutdown_grace_seconds=0.2,
            registry_target=f"127.0.0.1:{registry.port}",
            registry_retry_seconds=5,
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


FAKE_RECIPE = "fake.py"
FAKE_RECIPE_SOURCE = """def build_model(input_shape, num_classes, **params):
    raise NotImplementedError("the fake worker builds no model: its recipe_params say what it does")
"""
"""The recipe of the jobs the fake workers run: it takes any parameter (the fake worker's instructions)."""


@pytest.fixture
def trainer_settings(redis_server, tmp_path, agent_service) -> TrainerSettings:
    """Trainer settings for this test: its own Redis keys, scratch and recipes directories, and agents; short
    pauses so that restarts take tenths of a second."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / FAKE_RECIPE).write_text(FAKE_RECIPE_SOURCE)
    (tmp_path / "data").mkdir()
    unique = uuid.uuid4().hex[:8]
    return TrainerSettings(
        port=0,
        consul_enabled=False,
        redis_url=redis_server.url,
        scratch_dir=tmp_path / "trainer-scratch",
        recipes_dir=tmp_path / "recipes",
        dataset_roots=[REPO_ROOT / "data", tmp_path / "data"],
        agent_service=agent_service,
        redis_key_prefix=f"mg:unit-trainer:{unique}:",
        leader_key=f"modelgrid/trainer/unit-{unique}",  # trainers of other tests elect their leaders apart
        restart_backoff_seconds=0.1,
        schedule_interval_seconds=0.2,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def cores(
    trainer_settings, agent_client, registry_client
) -> AsyncIterator[Callable[..., Awaitable[TrainerCore]]]:
    """`await cores(registry=None, epoch=1)`: a TrainerCore leading with `epoch` on this test's Redis keys and
    agents (several share the store, as trainers restarted one after the other do, or a standby that takes over
    with a newer epoch); every core is stopped after the test. Without a registry client the core gets the
    in-process registry's, the one the agents use."""
    redis = create_redis(trainer_settings.redis_url)
    started: list[TrainerCore] = []

    async def start(registry: AsyncRegistryClient | None = None, epoch: int = 1) -> TrainerCore:
        trainer_settings.scratch_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(redis, trainer_settings.redis_key_prefix)
        core = TrainerCore(store, agent_client, registry or registry_client, trainer_settings)
        await core.start(epoch)
        started.append(core)
        return core

    yield start
    for core in started:
        await core.stop()
    await redis.aclose()


@pytest.fixture
def digits_npz() -> Path:
    return REPO_ROOT / "data" / "digits" / "digits.npz"
