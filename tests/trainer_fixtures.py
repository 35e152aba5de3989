"""Fixtures for trainer tests: a registry, worker agents and a trainer as real subprocesses on one Consul."""

import time
import uuid
from pathlib import Path

import grpc

from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from tests.support import REPO_ROOT, ServiceProcess

DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"
DIGITS_CSV = REPO_ROOT / "data" / "digits" / "digits.csv"
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def start_agent(consul_url: str, data_dir: Path, slots: int = 1) -> ServiceProcess:
    name = f"agent-{uuid.uuid4().hex[:6]}"
    env = {
        "CONSUL_URL": consul_url,
        "SLOTS": str(slots),
        "WORK_DIR": str(data_dir / name),
        "CONSUL_CHECK_INTERVAL": "1s",
        "CONSUL_DEREGISTER_AFTER": "1m",
    }
    return ServiceProcess("services.trainer.agent", "MODELGRID_AGENT_", env, data_dir / f"{name}.log").start()


def start_trainer(consul_url: str, redis_url: str, data_dir: Path, prefix: str, **settings: str) -> ServiceProcess:
    env = {
        "CONSUL_URL": consul_url,
        "REDIS_URL": redis_url,
        "SHARED_DIR": str(data_dir / "shared"),
        "RECIPES_DIR": str(data_dir / "recipes"),
        "REDIS_KEY_PREFIX": prefix,
        "RECORD_SHARD_IDS": "true",
        "RESTART_BACKOFF_SECONDS": "0.2",
        "CONSUL_CHECK_INTERVAL": "1s",
        **settings,
    }
    (data_dir / "recipes").mkdir(parents=True, exist_ok=True)
    return ServiceProcess("services.trainer", "MODELGRID_TRAINER_", env, data_dir / "trainer.log").start()


def digits_spec(**overrides) -> pb.JobSpec:
    """A small MLP on the shipped digits data set, two workers."""
    spec = pb.JobSpec(
        name="digits-mlp",
        recipe="mlp",
        dataset=pb.Dataset(local_path=str(DIGITS_NPZ), format="npz", features_key="x", label_key="y"),
        hyper_parameters=pb.HyperParameters(
            epochs=8, batch_size=32, learning_rate=0.01, optimizer="adam", validation_split=0.2, seed=1
        ),  # fmt: skip
        workers=2,
        checkpoint_every_steps=5,
        max_restarts=2,
        report_every_steps=5,
    )
    spec.recipe_params.update({"hidden_units": [64]})
    for key, value in overrides.items():
        if isinstance(value, list):
            getattr(spec, key).extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(spec, key).CopyFrom(value)
        else:
            setattr(spec, key, value)
    return spec


def stub_for(target: str) -> tuple[grpc.Channel, trainer_pb2_grpc.TrainerStub]:
    channel = grpc.insecure_channel(target)
    return channel, trainer_pb2_grpc.TrainerStub(channel)


def wait_for(stub, job_id: str, predicate, timeout: float = 240) -> pb.Job:
    """Polls GetJob until predicate(job) holds."""
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
        if predicate(job):
            return job
        if job.state in FINAL:
            raise AssertionError(f"job ended {pb.JobState.Name(job.state)} while waiting: {job}")
        assert time.monotonic() < deadline, f"timed out waiting on job {job_id}: {job}"
        time.sleep(0.2)


def events_of(stub, job_id: str, timeout: float = 300) -> list[pb.JobEvent]:
    """Every event of a job until its final state (WatchJob ends there)."""
    return list(stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout))
