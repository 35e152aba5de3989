"""The distributed trainer end to end: real Consul, Redis, registry, worker agents and TensorFlow worker
processes training on the shipped digits data set."""

import json
import os
import signal
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from modelgrid.agent.v1 import agent_pb2, agent_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.kit.localinfra import ConsulAgent
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow

DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"
DIGITS_CSV = REPO_ROOT / "data" / "digits" / "digits.csv"
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}

CRASHING_RECIPE = '''
"""A recipe that always crashes its worker (for the restart budget test)."""
import os


def build_model(input_shape, num_classes, **params):
    os._exit(3)
'''


@pytest.fixture(scope="module")
def cluster(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for):
    tmp = tmp_path_factory.mktemp("trainer")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        prefix = f"mg:test-trainer:{uuid.uuid4().hex[:6]}:"
        with launch.together():  # the trainer finds the registry and the agents in Consul when it needs them
            registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
            agents = [launch.agent(consul.http_url, tmp) for _ in range(2)]
            trainer = launch.trainer(consul.http_url, redis_server.url, tmp, prefix)
        (tmp / "recipes" / "crash.py").write_text(CRASHING_RECIPE)
        registry_channel, registry_client = client_for(registry)
        channel = trainer.channel()
        stub = trainer_pb2_grpc.TrainerStub(channel)
        ns = SimpleNamespace(
            tmp=tmp,
            consul=consul,
            redis_url=redis_server.url,
            registry=registry,
            registry_client=registry_client,
            agents=agents,
            trainer=trainer,
            stub=stub,
            prefix=prefix,
        )
        _wait_workers(ns, 2)
        try:
            yield ns
        finally:
            channel.close()
            registry_channel.close()
            ns.trainer.stop()
            for agent in ns.agents:
                agent.stop()
            registry.stop()


def _wait_workers(ns, count: int, timeout: float = 30) -> list[pb.Worker]:
    deadline = time.monotonic() + timeout
    while len(workers := ns.stub.ListWorkers(pb.ListWorkersRequest()).workers) != count:
        assert time.monotonic() < deadline, f"expected {count} agents, have {workers}"
        time.sleep(0.2)
    return list(workers)


def _agent_stub(ns, agent_id: str) -> agent_pb2_grpc.WorkerAgentStub:
    port = int(agent_id.rsplit("-", 1)[1])
    agent = next(a for a in ns.agents if a.port == port)
    return agent_pb2_grpc.WorkerAgentStub(agent.channel(identity="trainer"))  # the agents accept only the trainer


def _worker_pid(ns, job: pb.Job, task_index: int) -> int:
    placement = next(p for p in job.placements if p.task_index == task_index)
    replicas = _agent_stub(ns, placement.agent).ListReplicas(agent_pb2.ListReplicasRequest(job_id=job.id)).replicas
    (replica,) = [r for r in replicas if r.task_index == task_index and r.attempt == job.attempt]
    assert replica.pid > 0, replica  # 0: not started yet (os.kill(0, ...) would signal this test's own group)
    return replica.pid


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


def _submit(ns, spec: pb.JobSpec, request_id: str = "") -> pb.Job:
    return ns.stub.SubmitJob(pb.SubmitJobRequest(spec=spec, request_id=request_id))


def _state(job_or_event) -> str:
    return pb.JobState.Name(job_or_event.state)


# -- the happy path ------------------------------------------------------------------------------------------


def test_two_worker_job_trains_registers_and_the_model_predicts(cluster, digits_spec, unique):
    model = unique("digits")
    spec = digits_spec(register_model=model, register_aliases=["production"])
    job = _submit(cluster, spec, request_id=f"req-{model}")
    assert _submit(cluster, spec, request_id=f"req-{model}").id == job.id  # a retried submit is the same job

    events = events_of(cluster.stub, job.id)
    done = cluster.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert _state(done) == "JOB_STATE_SUCCEEDED", done
    states = [pb.JobState.Name(e.state) for e in events if e.type == pb.JOB_EVENT_TYPE_STATE]
    assert states[:4] == ["JOB_STATE_PENDING", "JOB_STATE_SCHEDULING", "JOB_STATE_STARTING", "JOB_STATE_RUNNING"]
    assert states[-2:] == ["JOB_STATE_FINALIZING", "JOB_STATE_SUCCEEDED"]
    assert any(e.type == pb.JOB_EVENT_TYPE_EPOCH for e in events)
    assert sorted({p.agent for p in done.placements}) == sorted(w.id for w in _wait_workers(cluster, 2))  # spread
    assert done.metrics["val_accuracy"] >= 0.85, done.metrics

    version = cluster.registry_client.stub.Resolve(rpb.ResolveRequest(ref={"name": model, "alias": "production"}))
    assert version.version == done.registered_version
    assert version.lineage.training_job_id == job.id
    assert version.lineage.dataset_digest == done.dataset_digest
    assert version.metrics["val_accuracy"] == pytest.approx(done.metrics["val_accuracy"])
    assert version.params["workers"] == "2"
    assert [s.name for s in version.signatures] == ["serving_default"]

    import tensorflow as tf

    cluster.registry_client.pull(f"{model}@production", cluster.tmp / "pulled")
    serve = tf.saved_model.load(str(cluster.tmp / "pulled")).signatures["serving_default"]
    with np.load(DIGITS_NPZ) as data:
        x, y = data["x"].astype("float32"), data["y"]
    accuracy = float(np.mean(np.argmax(serve(x=tf.constant(x))["probabilities"].numpy(), axis=1) == y))
    assert accuracy >= 0.85

    # Each worker recorded its shard in its own checkpoint dir, in its own agent's work dir: nothing is shared.
    records = sorted(cluster.tmp.glob(f"agent-*/{job.id}/1/task-*/checkpoints/shards/task-*.json"))
    assert len({p.parents[5] for p in records}) == 2, records
    shards = [json.loads(p.read_text()) for p in sorted(records, key=lambda p: p.name)]
    assert len(shards) == 2
    ids = [set(s["ids"]) for s in shards]
    assert ids[0] and ids[1] and not ids[0] & ids[1], "the two workers read overlapping examples"
    assert len(ids[0] | ids[1]) == round(len(y) * 0.8) or len(ids[0] | ids[1]) > 0.75 * len(y)


# -- failures and recovery -----------------------------------------------------------------------------------


def test_kill_9_of_a_worker_restarts_the_group_from_its_checkpoint(cluster, digits_spec):
    job = _submit(cluster, digits_spec(step_delay_ms=40, max_restarts=2))
    running = wait_for(cluster.stub, job.id, lambda j: j.state == pb.JOB_STATE_RUNNING and j.step >= 25)
    os.kill(_worker_pid(cluster, running, 1), signal.SIGKILL)
    events = events_of(cluster.stub, job.id)
    done = cluster.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert _state(done) == "JOB_STATE_SUCCEEDED", done
    (restart,) = [e for e in events if e.type == pb.JOB_EVENT_TYPE_RESTART]
    assert (restart.failure.task_index, restart.failure.exit_code) == (1, -9)
    assert "signal 9" in restart.failure.reason
    (resumed,) = [e for e in events if e.type == pb.JOB_EVENT_TYPE_RESUMED]
    assert resumed.step > 0, "training started over instead of resuming from the checkpoint"
    assert 0 < resumed.recovery_seconds < 120
    assert (done.restarts, done.preemptions, done.attempt) == (1, 0, 2)


def test_sigterm_preempts_saves_and_resumes_at_the_same_step_without_spending_the_budget(cluster, digits_spec):
    job = _submit(cluster, digits_spec(step_delay_ms=40, max_restarts=0))
    running = wait_for(cluster.stub, job.id, lambda j: j.state == pb.JOB_STATE_RUNNING and j.step >= 25)
    os.kill(_worker_pid(cluster, running, 0), signal.SIGTERM)
    events = events_of(cluster.stub, job.id)
    done = cluster.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert _state(done) == "JOB_STATE_SUCCEEDED", done
    (restart,) = [e for e in events if e.type == pb.JOB_EVENT_TYPE_RESTART]
    assert restart.failure.exit_code == 42
    (resumed,) = [e for e in events if e.type == pb.JOB_EVENT_TYPE_RESUMED]
    assert resumed.step == restart.step > 0
    assert (done.restarts, done.preemptions) == (0, 1)


def test_a_recipe_that_always_crashes_spends_the_budget_then_fails(cluster, digits_spec):
    job = _submit(cluster, digits_spec(recipe="file:crash.py", max_restarts=1))
    events = events_of(cluster.stub, job.id)
    done = cluster.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert _state(done) == "JOB_STATE_FAILED"
    assert done.restarts == 1 and done.failure.exit_code == 3
    assert "code 3" in done.failure.reason
    assert len([e for e in events if e.type == pb.JOB_EVENT_TYPE_RESTART]) == 1


# -- scheduling ----------------------------------------------------------------------------------------------


def test_cancel_while_running_frees_the_slots(cluster, digits_spec):
    job = _submit(cluster, digits_spec(step_delay_ms=100))
    running = wait_for(cluster.stub, job.id, lambda j: j.state == pb.JOB_STATE_RUNNING)
    pids = [_worker_pid(cluster, running, t) for t in (0, 1)]
    assert sum(w.used_slots for w in cluster.stub.ListWorkers(pb.ListWorkersRequest()).workers) == 2
    cluster.stub.CancelJob(pb.CancelJobRequest(id=job.id))
    events_of(cluster.stub, job.id)
    assert _state(cluster.stub.GetJob(pb.GetJobRequest(id=job.id))) == "JOB_STATE_CANCELLED"
    assert sum(w.used_slots for w in cluster.stub.ListWorkers(pb.ListWorkersRequest()).workers) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_job_that_does_not_fit_waits_then_runs_when_an_agent_joins(cluster, digits_spec, launch):
    short = pb.HyperParameters(epochs=2, batch_size=32, learning_rate=0.01, optimizer="adam", validation_split=0.2)
    job = _submit(cluster, digits_spec(workers=3, hyper_parameters=short))
    pending = wait_for(cluster.stub, job.id, lambda j: "waiting for 3 free slots" in j.message, timeout=30)
    assert pending.state == pb.JOB_STATE_PENDING
    cluster.agents.append(launch.agent(cluster.consul.http_url, cluster.tmp))
    events_of(cluster.stub, job.id)
    done = cluster.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert _state(done) == "JOB_STATE_SUCCEEDED", done
    assert len({p.agent for p in done.placements}) == 3


def test_restarting_the_trainer_mid_job_neither_loses_nor_repeats_it(cluster, digits_spec, launch):
    job = _submit(cluster, digits_spec(step_delay_ms=40))
    wait_for(cluster.stub, job.id, lambda j: j.state == pb.JOB_STATE_RUNNING and j.step >= 15)
    assert cluster.trainer.terminate() == 0
    cluster.trainer = launch.trainer(
        cluster.consul.http_url, cluster.redis_url, cluster.tmp, cluster.prefix, PORT=str(cluster.trainer.port)
    )
    events_of(cluster.stub, job.id)
    done = cluster.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert _state(done) == "JOB_STATE_SUCCEEDED", done
    assert (done.attempt, done.restarts) == (1, 0), "the job was started again instead of re-attached"


# -- bad specs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"recipe": "transformer"}, "unknown recipe"),
        ({"recipe": "file:../crash.py"}, "outside the recipes directory"),
        ({"recipe": "file:/etc/passwd"}, "relative"),
        ({"workers": 0}, "workers must be between"),
        ({"dataset": {"local_path": "/nonexistent/digits.npz", "format": "npz"}}, "inside the trainer's data set"),
        ({"dataset": {"local_path": "/etc/shadow", "format": "csv", "label_column": "root"}}, "inside the trainer's"),
        ({"dataset": {"blob_digest": "../../../etc", "format": "npz"}}, "64 lower-case hex"),
        ({"dataset": {"blob_digest": "ab" * 32, "format": "npz"}}, "not in the registry"),
        ({"dataset": {"local_path": str(DIGITS_CSV), "format": "csv", "label_column": "digit"}}, "no column"),
        ({"dataset": {"local_path": str(DIGITS_NPZ), "format": "npz", "label_key": "labels"}}, "no array"),
    ],
)
def test_bad_specs_are_invalid_argument_and_nothing_is_queued(cluster, overrides, fragment, digits_spec):
    spec = digits_spec()
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec.ClearField(key)
            getattr(spec, key).MergeFrom(pb.Dataset(**value))
        else:
            setattr(spec, key, value)
    before = len(cluster.stub.ListJobs(pb.ListJobsRequest(page_size=500)).jobs)
    with pytest.raises(grpc.RpcError) as err:
        _submit(cluster, spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    assert len(cluster.stub.ListJobs(pb.ListJobsRequest(page_size=500)).jobs) == before


def test_unknown_job_is_not_found(cluster):
    for call, request in [
        (cluster.stub.GetJob, pb.GetJobRequest(id="nope")),
        (cluster.stub.CancelJob, pb.CancelJobRequest(id="nope")),
        (lambda r: next(cluster.stub.WatchJob(r)), pb.WatchJobRequest(id="nope")),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
