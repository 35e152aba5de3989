"""A worker agent's side of "no shared filesystem", on the supervisor in process (no gRPC to it) with the in-process
registry: a data set blob is downloaded once into the agent's content-addressed cache and verified (a corrupted copy
is fetched again), a spec naming paths of the trainer's host is refused, the checkpoint and SavedModel a worker
announces are uploaded and reported on its replica, and another agent with a work dir of its own restores that
checkpoint before its worker starts."""

import asyncio
import hashlib
import json
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent.types import Checkpoint, ReplicaData, ReplicaKey, ReplicaState, ReplicaStatus
from services.clients.agent.worker_spec import DatasetSpec, WorkerSpec
from services.kit.processes import REPO_ROOT
from services.trainer.agent.settings import AgentSettings
from services.trainer.agent.supervisor import LOG_FILE, ReplicaSupervisor
from services.trainer.exit_codes import ExitCode

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Reads the spec its agent wrote, prints what it found (the data set's sha256, the restored checkpoint's step) as a
# JSON line on stdout; with recipe_params {"outputs": true} it announces a checkpoint snapshot and an export.
WORKER = r"""
import hashlib, json, os, sys
from pathlib import Path

from services.clients.agent.worker_spec import WorkerSpec
from services.trainer.progress import CheckpointSaved, Exported, Finished

spec = WorkerSpec.from_json(Path(sys.argv[sys.argv.index("--spec") + 1]).read_text())
progress = open(os.environ["MODELGRID_PROGRESS_FILE"], "a")


def emit(event):
    progress.write(event.to_json() + "\n")
    progress.flush()


restored = Path(spec.checkpoint_dir) / "backup" / "chief" / "step"
found = {
    "dataset_sha256": hashlib.sha256(Path(spec.dataset.paths[0]).read_bytes()).hexdigest(),
    "restored": restored.read_text() if restored.exists() else None,
}
print("found " + json.dumps(found), flush=True)
if spec.recipe_params.get("outputs"):
    snapshot = Path(spec.checkpoint_dir) / "snapshots" / "step-7"
    snapshot.mkdir(parents=True)
    (snapshot / "step").write_text("7")
    emit(CheckpointSaved(step=7, path=str(snapshot)))
    export = Path(spec.export_dir)
    export.mkdir(parents=True)
    (export / "saved_model.pb").write_bytes(b"")
    emit(Exported(path=str(export), metrics={}))
emit(Finished(task=0, step=7))
"""


@pytest.fixture
def worker(tmp_path: Path) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [sys.executable, str(script)]


@pytest_asyncio.fixture(loop_scope="session")
async def supervisors(
    tmp_path: Path, registry_client: AsyncRegistryClient, worker: list[str]
) -> AsyncIterator[Callable[[str], Awaitable[ReplicaSupervisor]]]:
    """`await supervisors(name)`: an agent's supervisor with its own work dir (`tmp_path/<name>`) and the in-process
    registry; all are closed after the test."""
    opened: list[ReplicaSupervisor] = []

    async def open_one(name: str) -> ReplicaSupervisor:
        settings = AgentSettings(
            port=0,
            consul_enabled=False,
            slots=4,
            worker_command=worker,
            worker_env={"PYTHONPATH": str(REPO_ROOT)},
            registry_retry_seconds=2,
        )
        supervisor = ReplicaSupervisor(settings, registry_client)
        await supervisor.open(tmp_path / name, f"agent-{name}")
        opened.append(supervisor)
        return supervisor

    yield open_one
    for supervisor in opened:
        await supervisor.close(1)


def template(**params) -> WorkerSpec:
    """A trainer's worker spec: no path anywhere."""
    return WorkerSpec(recipe="mlp", dataset=DatasetSpec(format="npz"), recipe_params=params, attempt=1)


async def run(supervisor: ReplicaSupervisor, key: ReplicaKey, spec: WorkerSpec, data: ReplicaData) -> ReplicaStatus:
    """Starts the replica and returns its status once it exited."""
    await supervisor.start_replica(key, "", spec.to_json(), data)
    deadline = time.monotonic() + 30
    while True:
        (status,) = [r for r in supervisor.list_replicas(key.job_id) if r.key == key]
        if status.state == ReplicaState.EXITED:
            return status
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.05)


def found(work_dir: Path, key: ReplicaKey) -> dict:
    """What the worker of `key` found, from its log in the agent's work dir."""
    log = work_dir / key.job_id / str(key.attempt) / f"task-{key.task_index}" / LOG_FILE
    (line,) = [line for line in log.read_text().splitlines() if line.startswith("found ")]
    return json.loads(line.removeprefix("found "))


async def test_a_data_set_blob_is_downloaded_once_verified_and_a_corrupted_copy_fetched_again(
    supervisors, registry_client, digits_npz, tmp_path
):
    agent = await supervisors("agent-a")
    blob = await registry_client.upload_blob(digits_npz)
    data = ReplicaData(dataset_digest=blob.digest)

    first = await run(agent, ReplicaKey("job-1", 1, 0), template(), data)
    second = await run(agent, ReplicaKey("job-1", 1, 1), template(), data)

    assert (first.exit_code, second.exit_code) == (0, 0)
    cached = agent.cache.path(blob.digest)
    assert cached == (tmp_path / "agent-a").resolve() / "cache" / "sha256" / blob.digest and cached.is_file()
    assert agent.cache.downloads == 1, "the second replica of the data set downloaded it again"
    for task in (0, 1):
        assert found(tmp_path / "agent-a", ReplicaKey("job-1", 1, task))["dataset_sha256"] == blob.digest

    cached.write_bytes(b"not the data set")  # a corrupted cache entry
    third = await run(agent, ReplicaKey("job-1", 2, 0), template(), data)

    assert third.exit_code == 0 and agent.cache.downloads == 2
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == blob.digest
    assert found(tmp_path / "agent-a", ReplicaKey("job-1", 2, 0))["dataset_sha256"] == blob.digest


async def test_a_missing_blob_ends_the_replica_as_unusable_and_trainer_paths_are_refused(supervisors, digits_npz):
    agent = await supervisors("agent-a")

    status = await run(agent, ReplicaKey("job-2", 1, 0), template(), ReplicaData(dataset_digest="ab" * 32))

    assert status.exit_code == ExitCode.INVALID_SPEC and status.pid == 0
    assert "preparing the worker failed" in status.error and "ab" * 32 in status.error
    data = ReplicaData(dataset_digest="ab" * 32)
    named = [
        {"checkpoint_dir": "/shared/jobs/x/checkpoints"},
        {"export_dir": "/shared/jobs/x/export"},
        {"recipes_dir": "/srv/recipes"},
        {"dataset": {"format": "npz", "paths": [str(digits_npz)]}},
    ]
    for fields in named:
        spec = {**json.loads(template().to_json()), **fields}
        with pytest.raises(InvalidArgument, match="names no path"):
            await agent.start_replica(ReplicaKey("job-2", 2, 0), "", json.dumps(spec), data)
    with pytest.raises(InvalidArgument, match="digest"):
        await agent.start_replica(ReplicaKey("job-2", 2, 0), "", template().to_json(), ReplicaData("../../etc"))
    assert [r.key.attempt for r in agent.list_replicas("job-2")] == [1]


async def test_what_a_chief_announces_is_uploaded_and_another_agent_restores_its_checkpoint(
    supervisors, registry_client, digits_npz, tmp_path
):
    chief_host, other_host = await supervisors("host-a"), await supervisors("host-b")
    blob = await registry_client.upload_blob(digits_npz)

    status = await run(chief_host, ReplicaKey("job-3", 1, 0), template(outputs=True), ReplicaData(blob.digest))

    assert status.exit_code == 0 and not status.error, status
    assert status.checkpoint is not None and status.checkpoint.step == 7 and status.export is not None
    snapshots = tmp_path / "host-a" / "job-3" / "1" / "task-0" / "checkpoints" / "snapshots"
    assert not any(snapshots.iterdir()), "an uploaded snapshot stays on the agent's disk"
    await registry_client.download_blob(status.export.digest, tmp_path / "export.tar")
    with tarfile.open(tmp_path / "export.tar") as tar:
        assert tar.getnames() == ["saved_model.pb"]

    restore = Checkpoint(status.checkpoint.digest, status.checkpoint.step)
    resumed = await run(other_host, ReplicaKey("job-3", 2, 1), template(), ReplicaData(blob.digest, restore))

    assert resumed.exit_code == 0 and resumed.checkpoint is None and resumed.export is None
    assert found(tmp_path / "host-b", ReplicaKey("job-3", 2, 1)) == {"dataset_sha256": blob.digest, "restored": "7"}
    restored = tmp_path / "host-b" / "job-3" / "2" / "task-1" / "checkpoints" / "backup" / "chief" / "step"
    assert restored.read_text() == "7"

    await other_host.release_ports("job-3")  # the job ended: its checkpoints leave the host, its log stays
    assert not restored.exists() and (restored.parents[3] / LOG_FILE).exists()
    assert other_host.list_replicas("job-3") == []
